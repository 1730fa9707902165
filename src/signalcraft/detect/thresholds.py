"""Adaptive anomaly thresholds and the k-of-n alert rule.

Each (microphone, source) has a :class:`ThresholdState`: a warning and a critical level
on its anomaly score, fitted once on the calibration scores (:func:`fit`) and then moved
by :func:`decide`, a pure function of (state, score) that returns the status of the
score and the next state. The caller saves the state beside the score (``store.py``) and
records every reported change of level.

Adaptation follows slow drift (a bearing warming in, a room getting louder) and nothing
else: only NORMAL scores at or below the warning level update the running mean and
variance the levels derive from, so a developing fault, whose scores are above the
warning level, is never learnt as normal.

A single loud segment (a door, a forklift) must not page anyone: CRITICAL needs
``alerts.k`` of the last ``alerts.n`` scores above the critical level, and WARNING
``alerts.warning_k`` of the last ``alerts.warning_n`` above the warning level (scores
above the critical level that do not yet meet the first rule count for the second). A
score above the warning level that meets neither is NORMAL, but like a WARNING it is
never learnt: the levels adapt to scores at or below the warning level only. (With a
warning level at the 0.99 quantile and WARNING on every score above it, a healthy room of
3 machines at 4 microphones, 12 streams, would raise one about every 80 s.)

A fault can also be too small for any one segment to pass a level. So each state
accumulates a one-sided CUSUM of standardised scores: each score at or below the
warning level adds how many standard deviations it lies above the mean of all normal
scores, less ``cusum_slack``; it never goes below 0. Scores above the warning level
leave it as it is: spikes are the k-of-n rule's, and a door slammed every half minute
must not page. Past ``cusum_limit`` the score is CRITICAL. Normal scores drain it by
about ``cusum_slack`` each, and it is held at most at ``CUSUM_CAP`` times
``cusum_limit``, so a CRITICAL it raised ends within a bounded time once the sound is
normal again, however long the rise lasted. The moments it standardises with adapt as
the levels do, so a step the adaptation follows (a room that got louder) drains too,
while a rise faster than the adaptation, or one that leaves the NORMAL range, keeps
accumulating.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np
import scipy.special

from ..config import DetectConfig
from ..errors import SignalcraftError

NORMAL, WARNING, CRITICAL = "NORMAL", "WARNING", "CRITICAL"
METHODS = ("gamma", "sigma", "percentile")

MIN_FIT_SCORES = 5  # finite calibration scores needed to fit levels
# Scores that hardly vary (a model that outputs nearly the same error every time) would
# give zero-width levels that flag any change at all; the spread is floored at this
# fraction of the mean.
MIN_RELATIVE_STD = 1e-3
# A level change is reported once it moves by more than this fraction from the level
# last reported. At adapt_rate 0.01 sampling noise alone moves the levels by about 5%
# (one standard deviation); reporting smaller steps would log a change every few
# segments and bury real drift in the history.
CHANGE_REPORT_FRACTION = 0.10
# The CUSUM is held at most at this multiple of cusum_limit: evidence beyond it adds
# nothing to a CRITICAL already raised, and without a ceiling an alarm that lasted hours
# would stay CRITICAL for hours after the sound is normal again (the sum drains by about
# cusum_slack a segment). With the defaults it ends within about 40 normal segments.
CUSUM_CAP = 2.0


class ThresholdError(SignalcraftError, ValueError):
    """Scores cannot give thresholds (too few, negative), or a saved state is malformed."""


@dataclasses.dataclass(frozen=True)
class ThresholdState:
    """Levels of one (microphone, source) and what they are derived from.

    ``mean`` and ``var`` follow the NORMAL scores at or below the warning level only:
    a distribution cut off at its top ``1 - warning_quantile``. Levels
    need the moments of all scores, so the fit keeps the ratio of the two
    (``mean_factor``, ``var_factor``); without it the cut-off tail would pull the levels
    down at every update and about double the rate of scores above the warning level on
    a healthy machine.

    Fields after ``recent`` may be left out when building a state by hand: ``fit_*`` and
    ``reported_*`` default to the current mean and levels, the factors to 1.
    """

    method: str  # gamma | sigma | percentile; fixed at fit, a new method needs a new fit
    # Current levels, in score units: a score above warning counts towards WARNING,
    # above critical towards CRITICAL (alerts.warning_k and alerts.k).
    warning: float
    critical: float
    # Running (EWMA) mean and variance of NORMAL scores.
    mean: float
    var: float
    n_fit: int  # calibration scores the levels were fitted on
    # One flag per recent score, oldest first, at most alerts.n: was it above critical?
    recent: tuple[bool, ...] = ()
    # Moments of all scores over moments of NORMAL scores, from the fit (>= 1): gamma
    # from the fitted distribution cut at its warning level, sigma and percentile from
    # the calibration scores. Fixed afterwards, which is exact for drift in scale.
    mean_factor: float = 1.0
    var_factor: float = 1.0
    # At fit: the NORMAL-score mean and the levels. percentile levels are fit_warning and
    # fit_critical times mean / fit_mean (see decide); the others keep them for the record.
    fit_mean: Optional[float] = None
    fit_warning: Optional[float] = None
    fit_critical: Optional[float] = None
    # Levels when a change was last reported (or at fit).
    reported_warning: Optional[float] = None
    reported_critical: Optional[float] = None
    cusum: float = 0.0  # accumulated standardised excess of recent scores (see the module docstring)
    # One flag per recent score, oldest first, at most alerts.warning_n: was it above
    # the warning level? (A state saved before it existed starts from ``recent``.)
    recent_warning: tuple[bool, ...] = ()

    def __post_init__(self):
        defaults = {
            "fit_mean": self.mean,
            "fit_warning": self.warning,
            "fit_critical": self.critical,
            "reported_warning": self.warning,
            "reported_critical": self.critical,
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: __post_init__ is the only way
        object.__setattr__(self, "recent", tuple(bool(r) for r in self.recent))
        object.__setattr__(self, "recent_warning", tuple(bool(r) for r in self.recent_warning))
        if self.method not in METHODS:
            raise ThresholdError(f"threshold method {self.method!r}: must be one of {', '.join(METHODS)}.")
        numbers = [self.warning, self.critical, self.mean, self.var, self.mean_factor, self.var_factor,
                   self.fit_mean, self.fit_warning, self.fit_critical, self.reported_warning,
                   self.reported_critical, self.cusum]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers) \
                or self.var < 0 or self.cusum < 0 or self.fit_mean <= 0 or self.mean_factor <= 0 or self.var_factor <= 0:
            raise ThresholdError(f"threshold state has a value that is not a positive finite number: {self}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; :meth:`from_dict` rebuilds the same state."""
        d = dataclasses.asdict(self)
        d["recent"] = list(self.recent)
        d["recent_warning"] = list(self.recent_warning)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ThresholdState":
        """The state saved by :meth:`to_dict`.

        Raises
        ------
        ThresholdError
            A key is missing or unknown, or a value is of the wrong kind.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names:
            unknown = ", ".join(sorted(set(d) - names)) if isinstance(d, dict) else type(d).__name__
            raise ThresholdError(f"threshold state: unknown keys or not a mapping: {unknown}.")
        try:
            # A state saved before recent_warning existed: its scores above the critical
            # level were above the warning level too, so a lasting alarm stays one.
            return cls(**{**d, "recent": tuple(d.get("recent", ())),
                          "recent_warning": tuple(d.get("recent_warning", d.get("recent", ())))})
        except TypeError as e:
            raise ThresholdError(f"threshold state: {e}.") from None


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one score means, and the state to keep for the next one."""

    status: str  # NORMAL | WARNING | CRITICAL
    state: ThresholdState  # the state after this score
    # Why the levels moved, e.g. 'drift: warning 0.123 -> 0.125, critical ... after NORMAL
    # score 0.101'; None unless they moved noticeably since the last reported change.
    change: Optional[str] = None
    # The score was above the warning level: never learnt as normal, whatever the status.
    above_warning: bool = False


def fit(scores: np.ndarray, config: DetectConfig, *, where: str = "calibration scores") -> ThresholdState:
    """Levels from calibration scores, by ``config.levels.method``.

    gamma (as the DCASE 2023 baseline): a gamma distribution with location 0 fitted by
    its moments, levels at its ``warning_quantile`` and ``critical_quantile``. It
    extrapolates the tail that 60 calibration scores cannot show. Moments, not maximum
    likelihood as the baseline: the scores (the worst bands of a segment) have a heavier
    tail than a gamma, and the likelihood fits the bulk, which put the 0.999 level below
    the calibration scores' own 0.99 quantile and about doubled the false WARNING and
    CRITICAL rates in scripts/bench_detection.py; the variance follows the tail. decide()
    adapts the same two moments. sigma: mean + ``warning_sigma`` / ``critical_sigma``
    standard deviations. percentile: the empirical quantiles, which for a critical
    quantile of 0.999 and a few dozen scores is about the largest score seen.

    Parameters
    ----------
    scores : np.ndarray
        Anomaly scores of the calibration segments, any shape; non-finite ones (from a
        failed segment) are left out.
    config : DetectConfig
    where : str
        Names the scores in error messages, e.g. ``"mic 0 / pump"``.

    Raises
    ------
    ThresholdError
        Fewer than ``MIN_FIT_SCORES`` finite scores, or a negative score.
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size < MIN_FIT_SCORES:
        raise ThresholdError(
            f"{where}: {x.size} finite scores, thresholds need at least {MIN_FIT_SCORES}; "
            "raise detect.calibration_segments or check why segments fail to score."
        )
    if np.any(x < 0) or x.mean() <= 0:
        raise ThresholdError(
            f"{where}: scores must be positive reconstruction errors, got minimum {x.min():.4g}; "
            "the detector model is not an autoencoder score: retrain it."
        )
    method = config.levels.method
    if method == "gamma":
        # A gamma is fixed by its mean and variance: _gamma_levels gives the fitted
        # quantiles now and continues them once decide() adapts the moments.
        full_mean, full_var = _moments(x)
        shape, scale = full_mean**2 / full_var, full_var / full_mean
        warning, critical = _gamma_levels(full_mean, full_var, config)
        mean, var = _gamma_moments_below(shape, scale, warning)
    else:
        full_mean, full_var = _moments(x)
        if method == "sigma":
            warning, critical = _sigma_levels(full_mean, full_var, config)
        else:
            quantiles = [config.levels.warning_quantile, config.levels.critical_quantile]
            warning, critical = (float(q) for q in np.quantile(x, quantiles))
        mean, var = _moments(x[x <= warning])
    return ThresholdState(method, warning, critical, mean=mean, var=var, n_fit=int(x.size),
                          mean_factor=full_mean / mean, var_factor=full_var / var)


def describe_fit(state: ThresholdState) -> str:
    """A reason string for the threshold history when levels are first fitted."""
    return (f"fit: {state.method} on {state.n_fit} calibration scores: warning {state.warning:.4g}, "
            f"critical {state.critical:.4g}")


def decide(state: ThresholdState, score: float, config: DetectConfig) -> Decision:
    """Status of ``score`` and the state after it. Pure: ``state`` is not changed.

    - CRITICAL: ``score > critical`` and at least ``alerts.k`` of the last ``alerts.n``
      scores (this one included) were above critical; or the CUSUM passes
      ``cusum_limit`` (module docstring).
    - WARNING: ``score > warning`` and at least ``alerts.warning_k`` of the last
      ``alerts.warning_n`` scores (this one included) were above warning.
    - NORMAL: otherwise. If also ``score <= warning``, the running mean and variance
      take the score with weight ``adapt_rate`` and the levels are recomputed from
      them, scaled to all scores by the fit's ``mean_factor`` and ``var_factor``: gamma
      by the method of moments, sigma as mean + k std; percentile as the fitted levels times
      ``mean / fit_mean`` (a ratio, not a difference: reconstruction errors drift in
      scale, as with a gain change, and a ratio keeps levels positive and their spread in
      proportion).

    Levels are derived from ``state.method``, not ``config.levels.method``.

    Raises
    ------
    ThresholdError
        ``score`` is negative or not finite (never adapted to: it would poison the state).
    """
    score = float(score)
    if not (math.isfinite(score) and score >= 0):
        raise ThresholdError(f"anomaly score {score!r}: must be a finite, non-negative number.")
    above_critical = score > state.critical
    above_warning = score > state.warning
    alerts = config.alerts
    recent = (state.recent + (above_critical,))[-alerts.n:]
    recent_warning = (state.recent_warning + (above_warning,))[-alerts.warning_n:]
    cusum = 0.0
    if alerts.cusum_limit is not None:
        cusum = state.cusum
        if not above_warning:
            z = (score - state.mean * state.mean_factor) / math.sqrt(state.var * state.var_factor)
            cusum = max(0.0, cusum + z - alerts.cusum_slack)
        cusum = min(cusum, CUSUM_CAP * alerts.cusum_limit)
    accumulated = alerts.cusum_limit is not None and cusum > alerts.cusum_limit
    if (above_critical and sum(recent) >= alerts.k) or accumulated:
        status = CRITICAL
    elif above_warning and sum(recent_warning) >= alerts.warning_k:
        status = WARNING
    else:
        status = NORMAL
    if status != NORMAL or above_warning or config.levels.adapt_rate == 0:
        return Decision(status, dataclasses.replace(state, recent=recent, recent_warning=recent_warning,
                                                    cusum=cusum), above_warning=above_warning)

    # Incremental EWMA of mean and variance (West 1979 / Finch 2009).
    alpha = config.levels.adapt_rate
    diff = score - state.mean
    mean = state.mean + alpha * diff
    var = _floor_var(mean, (1 - alpha) * (state.var + alpha * diff * diff))
    warning, critical = _levels(state, mean, var, config)
    new = dataclasses.replace(state, recent=recent, recent_warning=recent_warning, mean=mean, var=var,
                              warning=warning, critical=critical, cusum=cusum)
    if not (_moved(warning, state.reported_warning) or _moved(critical, state.reported_critical)):
        return Decision(status, new)
    change = (f"drift: warning {state.reported_warning:.4g} -> {warning:.4g}, "
              f"critical {state.reported_critical:.4g} -> {critical:.4g} after NORMAL score {score:.4g}")
    return Decision(status, dataclasses.replace(new, reported_warning=warning, reported_critical=critical), change)


def _levels(state: ThresholdState, mean: float, var: float, config: DetectConfig) -> tuple[float, float]:
    """(warning, critical) of ``state.method`` for an adapted mean and variance."""
    if state.method == "gamma":
        return _gamma_levels(mean * state.mean_factor, var * state.var_factor, config)
    if state.method == "sigma":
        return _sigma_levels(mean * state.mean_factor, var * state.var_factor, config)
    ratio = mean / state.fit_mean
    return state.fit_warning * ratio, state.fit_critical * ratio


def _gamma_levels(mean: float, var: float, config: DetectConfig) -> tuple[float, float]:
    # Method of moments: shape = mean^2 / var, scale = var / mean. gammaincinv is
    # gamma.ppf without scipy.stats' per-call overhead (about 100 times faster).
    shape, scale = mean * mean / var, var / mean
    q = np.array([config.levels.warning_quantile, config.levels.critical_quantile])
    warning, critical = scipy.special.gammaincinv(shape, q) * scale
    return float(warning), float(critical)


def _sigma_levels(mean: float, var: float, config: DetectConfig) -> tuple[float, float]:
    std = math.sqrt(var)
    return mean + config.levels.warning_sigma * std, mean + config.levels.critical_sigma * std


def _gamma_moments_below(shape: float, scale: float, level: float) -> tuple[float, float]:
    """(mean, variance) of a gamma cut off above ``level``, from the incomplete gamma
    function: E[X^k; X <= level] = scale^k Gamma(shape+k)/Gamma(shape) P(shape+k, level/scale)."""
    u = level / scale
    p0, p1, p2 = scipy.special.gammainc([shape, shape + 1, shape + 2], u)
    m1 = shape * scale * p1 / p0
    m2 = shape * (shape + 1) * scale**2 * p2 / p0
    return m1, _floor_var(m1, m2 - m1 * m1)


def _moments(x: np.ndarray) -> tuple[float, float]:
    """(mean, sample variance) of positive scores, variance floored."""
    mean = float(x.mean())
    return mean, _floor_var(mean, float(x.var(ddof=1)) if x.size > 1 else 0.0)


def _floor_var(mean: float, var: float) -> float:
    return max(var, (MIN_RELATIVE_STD * mean) ** 2)


def _moved(level: float, reported: float) -> bool:
    return abs(level - reported) > CHANGE_REPORT_FRACTION * abs(reported)
