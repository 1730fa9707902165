import dataclasses
import json

import numpy as np
import pytest
import scipy.stats

from signalcraft.config import DetectConfig
from signalcraft.detect.thresholds import (
    CRITICAL, CUSUM_CAP, NORMAL, WARNING, Decision, ThresholdError, ThresholdState, decide, describe_fit, fit,
)

SHAPE, SCALE = 4.0, 0.05  # a skewed, gamma-like score distribution
DEFAULTS = DetectConfig()


def levels(**settings) -> DetectConfig:
    """The default DetectConfig with these ``levels`` settings."""
    return dataclasses.replace(DEFAULTS, levels=dataclasses.replace(DEFAULTS.levels, **settings))


def gamma_scores(n: int, seed: int = 0, shape: float = SHAPE, scale: float = SCALE) -> np.ndarray:
    return np.random.default_rng(seed).gamma(shape, scale, n)


def stream(state: ThresholdState, scores, config: DetectConfig = DEFAULTS) -> tuple[list[Decision], ThresholdState]:
    decisions = []
    for score in scores:
        decisions.append(decide(state, score, config))
        state = decisions[-1].state
    return decisions, state


def statuses(decisions: list[Decision]) -> list[str]:
    return [d.status for d in decisions]


def alerts(**settings) -> DetectConfig:
    """The default DetectConfig with these ``alerts`` settings."""
    return dataclasses.replace(DEFAULTS, alerts=dataclasses.replace(DEFAULTS.alerts, **settings))


EVERY_SCORE_WARNS = alerts(warning_k=1, warning_n=1)


def fixed_state(**changes) -> ThresholdState:
    """Levels 1 and 2 around scores of about 0.5."""
    return ThresholdState(**{"method": "sigma", "warning": 1.0, "critical": 2.0, "mean": 0.5, "var": 0.01,
                             "n_fit": 60, **changes})


def test_gamma_levels_match_the_true_quantiles():
    state = fit(gamma_scores(2000), DEFAULTS)
    true_warning, true_critical = scipy.stats.gamma.ppf([0.99, 0.999], SHAPE, scale=SCALE)
    assert state.method == "gamma" and state.n_fit == 2000
    assert state.warning == pytest.approx(true_warning, rel=0.03)
    assert state.critical == pytest.approx(true_critical, rel=0.04)


def test_sigma_and_percentile_levels_on_known_scores():
    scores = np.arange(1.0, 101.0)  # mean 50.5, sample std 29.011
    sigma = fit(scores, levels(method="sigma"))
    assert sigma.warning == pytest.approx(50.5 + 3 * 29.0115, rel=1e-4)
    assert sigma.critical == pytest.approx(50.5 + 5 * 29.0115, rel=1e-4)
    percentile = fit(scores, levels(method="percentile", warning_quantile=0.9,
                                    critical_quantile=0.99))
    assert (percentile.warning, percentile.critical) == pytest.approx((90.1, 99.01))


def test_non_finite_scores_are_left_out_but_five_are_needed():
    scores = np.array([1.0, 2.0, np.nan, 3.0, np.inf, 4.0, 5.0])
    assert fit(scores, DEFAULTS).n_fit == 5
    with pytest.raises(ThresholdError, match="mic 0 / pump: 4 finite scores.*at least 5"):
        fit(scores[:-1], DEFAULTS, where="mic 0 / pump")
    with pytest.raises(ThresholdError, match="positive"):
        fit(np.array([1.0, 2.0, -3.0, 4.0, 5.0]), DEFAULTS)


def test_healthy_machine_passes_the_warning_level_at_the_configured_rate_and_never_pages():
    state = fit(gamma_scores(DEFAULTS.calibration_segments, seed=1), DEFAULTS)
    scores = gamma_scores(20000, seed=2)
    decisions, _ = stream(state, scores)
    counts = {s: statuses(decisions).count(s) for s in (NORMAL, WARNING, CRITICAL)}
    above = sum(d.above_warning for d in decisions)
    assert 0.005 < above / 20000 < 0.02  # 1 - warning_quantile = 1%
    # 3 of 5 above it: with independent scores about 10 x 0.01^3 of them.
    assert counts[WARNING] <= 5 and counts[CRITICAL] == 0
    single, _ = stream(state, scores, EVERY_SCORE_WARNS)
    assert statuses(single).count(WARNING) == above
    assert CRITICAL not in statuses(single)


def test_one_or_two_spikes_raise_nothing_the_third_within_five_pages():
    spike = 5.0
    decisions, _ = stream(fixed_state(), [spike, 0.5, spike, 0.5, spike, spike])
    assert statuses(decisions) == [NORMAL, NORMAL, NORMAL, NORMAL, CRITICAL, CRITICAL]
    assert [d.above_warning for d in decisions] == [True, False, True, False, True, True]
    decisions, _ = stream(fixed_state(), [spike, spike, spike])
    assert statuses(decisions) == [NORMAL, NORMAL, CRITICAL]
    # The third spike comes 5 segments after the first: only 2 of the last 5.
    decisions, _ = stream(fixed_state(), [spike, 0.5, 0.5, spike, 0.5, spike, spike])
    assert statuses(decisions) == [NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, CRITICAL]
    # With WARNING on every score above its level, the spikes short of CRITICAL warn.
    decisions, _ = stream(fixed_state(), [spike, 0.5, spike, 0.5, spike, spike], EVERY_SCORE_WARNS)
    assert statuses(decisions) == [WARNING, NORMAL, WARNING, NORMAL, CRITICAL, CRITICAL]


def test_scores_between_the_levels_warn_once_three_of_five_are_above_the_warning_level():
    between = 1.5  # above warning (1), below critical (2), which stay where they are
    frozen = levels(adapt_rate=0.0)
    decisions, state = stream(fixed_state(), [between, 0.5, between, 0.5, between, between, 0.5, 0.5, 0.5], frozen)
    assert statuses(decisions) == [NORMAL, NORMAL, NORMAL, NORMAL, WARNING, WARNING, NORMAL, NORMAL, NORMAL]
    assert state.recent_warning == (True, True, False, False, False)
    # A CRITICAL-level score counts towards WARNING as well.
    decisions, _ = stream(fixed_state(), [between, 5.0, between], frozen)
    assert statuses(decisions) == [NORMAL, NORMAL, WARNING]


def test_spikes_spread_wider_than_the_window_never_page_and_are_never_learnt():
    scores = [5.0 if i % 3 == 0 else 0.5 for i in range(60)]  # at most 2 in any 5
    decisions, state = stream(fixed_state(), scores)
    assert set(statuses(decisions)) == {NORMAL}
    assert len(state.recent) == DEFAULTS.alerts.n and len(state.recent_warning) == DEFAULTS.alerts.warning_n
    _, without_spikes = stream(fixed_state(), [0.5] * 40)  # the levels follow the 0.5s alone
    assert (state.mean, state.warning) == pytest.approx((without_spikes.mean, without_spikes.warning))
    decisions, _ = stream(fixed_state(), scores, EVERY_SCORE_WARNS)
    assert CRITICAL not in statuses(decisions)
    assert statuses(decisions)[::3] == [WARNING] * 20


def test_slow_drift_of_normal_scores_moves_the_levels_with_it():
    shape = 100.0  # narrow scores: unadapted levels would flag most of the drifted ones
    state = fit(gamma_scores(60, seed=3, shape=shape, scale=0.01), DEFAULTS)
    drift = np.linspace(1.0, 1.2, 2000)
    scores = gamma_scores(2000, seed=4, shape=shape, scale=0.01) * drift
    decisions, end = stream(state, scores)
    _, frozen = stream(state, scores, levels(adapt_rate=0.0))
    assert end.warning == pytest.approx(1.2 * state.warning, rel=0.1)
    assert end.critical == pytest.approx(1.2 * state.critical, rel=0.1)
    tail = statuses(decisions)[-500:]
    assert tail.count(CRITICAL) == 0 and tail.count(WARNING) < 15
    assert frozen.warning == state.warning  # without adaptation ...
    assert sum(s > state.warning for s in scores[-500:]) > 100  # ... the drift would warn


def test_fault_scores_never_move_the_levels():
    state = fit(gamma_scores(60, seed=5), DEFAULTS)
    _, state = stream(state, gamma_scores(200, seed=6))
    fault = gamma_scores(500, seed=7) + 2 * state.critical
    decisions, after = stream(state, fault)
    assert statuses(decisions)[:3] == [NORMAL, NORMAL, CRITICAL]
    assert set(statuses(decisions)[2:]) == {CRITICAL}
    for name in ("warning", "critical", "mean", "var", "reported_warning", "reported_critical"):
        assert getattr(after, name) == getattr(state, name)
    assert all(d.change is None for d in decisions)


def test_changes_are_reported_with_a_reason_when_levels_move_not_every_segment():
    state = fit(gamma_scores(60, seed=8, shape=100, scale=0.01), DEFAULTS)
    scores = gamma_scores(2000, seed=9, shape=100, scale=0.01) * np.linspace(1.0, 1.5, 2000)
    decisions, end = stream(state, scores)
    changes = [d.change for d in decisions if d.change is not None]
    assert 2 <= len(changes) < 20
    assert all(c.startswith("drift: warning ") and "after NORMAL score" in c for c in changes)
    assert f"-> {end.reported_warning:.4g}" in changes[-1]
    assert "fit: gamma on 60 calibration scores" in describe_fit(state)


def test_state_round_trips_through_json():
    _, state = stream(fit(gamma_scores(60), DEFAULTS), [0.1, 0.2, 5.0])
    assert state.recent == (False, False, True) and state.recent_warning == (False, False, True)
    data = json.loads(json.dumps(state.to_dict()))
    assert ThresholdState.from_dict(data) == state
    # A state saved before WARNING needed several segments: its scores above the
    # critical level were above the warning level too.
    del data["recent_warning"]
    data["recent"] = [True, True, False]
    assert ThresholdState.from_dict(data).recent_warning == (True, True, False)
    with pytest.raises(ThresholdError):
        ThresholdState.from_dict({**data, "recent_warning": None})
    with pytest.raises(ThresholdError, match="unknown keys.*colour"):
        ThresholdState.from_dict({**data, "colour": "red"})
    with pytest.raises(ThresholdError, match="warning"):
        ThresholdState.from_dict({k: v for k, v in data.items() if k != "warning"})


def test_decide_is_pure():
    state = fit(gamma_scores(60), DEFAULTS)
    before = state.to_dict()
    decision = decide(state, 0.1, DEFAULTS)
    assert decision.state != state and state.to_dict() == before
    with pytest.raises(ThresholdError, match="finite"):
        decide(state, float("nan"), DEFAULTS)


def test_a_slow_rise_below_every_level_is_caught_by_accumulation_not_by_k_of_n():
    state = fit(gamma_scores(60, seed=5), DEFAULTS)
    full_mean, full_sd = state.mean * state.mean_factor, (state.var * state.var_factor) ** 0.5
    # A worn part: scores creep up by 1.5 standard deviations over 100 segments, then
    # stay there, always below the warning level (so never above critical, never k of n).
    rng = np.random.default_rng(6)
    creep = full_mean + np.minimum(np.arange(300) / 100, 1.0) * 1.5 * full_sd
    scores = np.minimum(creep + 0.3 * full_sd * rng.standard_normal(300), 0.98 * state.warning)
    without = dataclasses.replace(DEFAULTS, alerts=dataclasses.replace(DEFAULTS.alerts, cusum_limit=None))
    assert CRITICAL not in statuses(stream(state, scores, without)[0])
    found = statuses(stream(state, scores)[0])
    assert CRITICAL in found and found.index(CRITICAL) < 200


def test_accumulation_stays_quiet_on_a_long_normal_stream_and_drains():
    state = fit(gamma_scores(60, seed=7), DEFAULTS)
    decisions, last = stream(state, gamma_scores(20000, seed=8))
    assert CRITICAL not in statuses(decisions)
    assert max(d.state.cusum for d in decisions) < DEFAULTS.alerts.cusum_limit / 2
    high = dataclasses.replace(last, cusum=DEFAULTS.alerts.cusum_limit - 1)
    _, drained = stream(high, gamma_scores(100, seed=9))
    assert drained.cusum < 5  # normal scores drain it by about cusum_slack each


def test_a_cusum_alarm_ends_soon_after_the_sound_is_normal_again_however_long_it_lasted():
    state = fit(gamma_scores(60, seed=15), DEFAULTS)
    full_sd = (state.var * state.var_factor) ** 0.5
    limit = DEFAULTS.alerts.cusum_limit
    lasting = {}
    for hours in (1, 6):
        n = hours * 360
        rise = np.minimum(gamma_scores(n, seed=16) + 1.5 * full_sd, 0.98 * state.warning)
        decisions, _ = stream(state, list(rise) + list(gamma_scores(1000, seed=17)))
        found = statuses(decisions)
        assert found[n - 100:n] == [CRITICAL] * 100
        assert max(d.state.cusum for d in decisions) == pytest.approx(CUSUM_CAP * limit)
        lasting[hours] = max(i for i, s in enumerate(found) if s == CRITICAL) + 1 - n
    # Held at CUSUM_CAP x the limit: about (2 - 1) x 20 / 0.5 = 40 normal segments at most.
    assert all(0 < after <= 60 for after in lasting.values())  # uncapped it grows with the rise
    without_cap = dataclasses.replace(state, cusum=50 * limit)  # a state saved before the cap
    assert decide(without_cap, float(gamma_scores(1, seed=18)[0]), DEFAULTS).state.cusum <= CUSUM_CAP * limit
    assert decide(without_cap, 100 * state.critical, DEFAULTS).state.cusum <= CUSUM_CAP * limit
