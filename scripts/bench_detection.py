"""Anomaly detection quality: signalcraft's detector against the DCASE 2020 Task 2
baseline, on `simulate` output and on real recordings.

The product calibrates one detector per (microphone, machine) on ten minutes of one
installed machine running normally, then watches that same machine. So the benchmark
does the same: for each machine type it renders ``--units`` units (``simulate``'s
``unit``: one design, speed, vane/blade/slot count and room per unit), and for each unit
and SNR (0 and -6 dB, machine over background at the microphone):

- training: ``--train`` normal recordings of that unit (60 = the product's 10 minutes
  of calibration); test: ``--test`` later normal recordings and their faulty twins for
  each fault (the same recording with the fault over the whole clip). Recordings of a
  unit differ as consecutive real ones do: their own speed and load drift, noise,
  background level and events.
- signalcraft: `detect.scorers.fit_detector` for each scorer kind of ``--scorers``
  (the default first) on the 1x240x240 log-mels the chain exports (no denoising, no
  separation: one machine); levels from `detect.scorers.cross_fit` and
  `detect.thresholds.fit`, as `detect` sets them.
- DCASE 2020 baseline, re-implemented: log-mel 128 bands, n_fft 1024, hop 512, 5 stacked
  frames (640-d), dense autoencoder 640-128-128-128-128-8-128-128-128-128-640 with
  batch norm and ReLU, MSE, score = mean frame error per clip; trained and tested on
  exactly the same recordings.

Each unit has its own detector, so scores of different units are not comparable: AUC and
pAUC(0.1) are computed per unit and averaged over the units of a condition (the worst
unit is shown too). The false WARNING / CRITICAL rates of the full decision rule (levels
fitted as `detect` fits them, k of n) come from a stream of ``--stream`` further normal
recordings of the first unit of each machine type and SNR; the time from the onset of
a developing fault (growing over ``--develop`` recordings) to CRITICAL from the same
unit. Also reported: the cold start's computation for 60 segments x 4 microphones x 4
sources, model size and scoring time, and, on the real recordings in
../shared/data/dcase2020, the alarms on held-out normal clips after calibrating on the
others. The real slide-rail recordings are scripts/bench_detection_real.py's.

    python scripts/bench_detection.py [--units 3 --train 60 --test 20 --stream 200 --scorers ensemble,autoencoder]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchlib import ROOT, write_section
from signalcraft import simulate
from signalcraft.config import DetectConfig, ScorerConfig, config_from_dict
from signalcraft.detect import thresholds as th
from signalcraft.detect.model import save_detector
from signalcraft.detect.scorers import SCORERS, cross_fit, fit_detector, pooled
from signalcraft.chain import Chain

SR = 16000  # Hz
FAULTS = {"pump": ("imbalance", "bearing", "looseness", "cavitation"), "fan": ("imbalance", "bearing", "looseness"),
          "motor": ("imbalance", "bearing", "looseness"), "valve": ("leak",)}
SEGMENTS_PER_DAY = 24 * 3600 / 10  # 10 s segments
SNRS = (0.0, -6.0)  # dB
# Recording seeds of unit u: training, test (normal and faulty twins), false-alarm stream.
TRAIN_SEED, TEST_SEED, STREAM_SEED, DEVELOP_SEED = 0, 100_000, 200_000, 300_000
DEVELOPED_HOLD = 10  # segments a developing fault stays at full size
DCASE = ROOT.parent / "shared" / "data" / "dcase2020"

CHAIN = Chain(config_from_dict({"capture": {"channels": [1]}, "denoise": {"enabled": False}}), (1,), SR)
# The tensors' feature settings, as `detect` passes them from the manifests (the flux
# scorer places its cutoff in Hz with them).
FEATURES = CHAIN.logmel.settings()


def clip(kind: str, unit: int, seed: int, snr: float, fault: str | None = None) -> np.ndarray:
    """Mono 10 s audio of one recording (``seed``) of one unit of a machine type in
    factory background, shape = (samples,). Unit u's recordings use seeds
    1_000_000 * (u + 1) + offset, so no two units share a recording's noise."""
    faults = [(kind, simulate.Fault(fault))] if fault else []
    scene = simulate.default_scene(machines=(kind,), n_mics=1, faults=faults, unit=unit,
                                   seed=1_000_000 * (unit + 1) + seed, snr_db=snr)
    return simulate.render(scene).mixture[0]


def ours_features(audio: list[np.ndarray]) -> torch.Tensor:
    return torch.cat([CHAIN.features(a[None])[:, 0][:, None] for a in audio])  # (N, 1, 240, 240)


# --- DCASE 2020 Task 2 baseline -------------------------------------------------------
def dcase_frames(audio: np.ndarray) -> np.ndarray:
    """(frames, 640): 5 stacked 128-band log-mel frames, as the baseline's file_to_vector_array."""
    import librosa

    mel = librosa.feature.melspectrogram(y=audio, sr=SR, n_fft=1024, hop_length=512, n_mels=128, power=2.0)
    logmel = 20.0 / 2.0 * np.log10(mel + np.finfo(float).eps)
    n = logmel.shape[1] - 5 + 1
    return np.concatenate([logmel[:, t:t + n] for t in range(5)], axis=0).T.astype(np.float32)


def dcase_model() -> torch.nn.Module:
    sizes = [640, 128, 128, 128, 128, 8, 128, 128, 128, 128]
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.BatchNorm1d(b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(128, 640))


def dcase_train(audio: list[np.ndarray], epochs: int = 30) -> torch.nn.Module:
    torch.manual_seed(0)
    x = torch.from_numpy(np.concatenate([dcase_frames(a) for a in audio]))
    model = dcase_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):  # the baseline trains 100 epochs at batch 512 on ~1000 clips
        for idx in torch.randperm(len(x), generator=g).split(512):
            loss = torch.nn.functional.mse_loss(model(x[idx]), x[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def dcase_score(model: torch.nn.Module, audio: list[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return np.array([float(((model(x) - x) ** 2).mean()) for x in
                         (torch.from_numpy(dcase_frames(a)) for a in audio)])


# --- metrics --------------------------------------------------------------------------
def auc(normal: np.ndarray, abnormal: np.ndarray, max_fpr: float = 1.0) -> float:
    """Area under the ROC curve (up to ``max_fpr``, normalised by it, as DCASE's pAUC)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(normal)), np.ones(len(abnormal))]
    s = np.r_[normal, abnormal]
    if max_fpr >= 1.0:
        return float(roc_auc_score(y, s))
    # DCASE reports the un-standardised partial AUC divided by max_fpr.
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, s)
    stop = np.searchsorted(fpr, max_fpr, "right")
    x = np.r_[fpr[:stop], max_fpr]
    yv = np.r_[tpr[:stop], np.interp(max_fpr, fpr, tpr)]
    return float(np.trapezoid(yv, x) / max_fpr)


def fitted_levels(train: torch.Tensor, kind: str, config: DetectConfig) -> th.ThresholdState:
    """Levels as `detect` sets them: the product's cross-fitted scores of the training
    data (one segment per tensor), then its level fit."""
    segments = [{(0, kind): t} for t in train]
    scores = cross_fit(segments, lambda tensors: fit_detector(tensors, FEATURES, config),
                       SCORERS[config.scorer.kind].cross_fit_folds)
    return th.fit(np.asarray(scores[(0, kind)]), config)


def false_alarms(state: th.ThresholdState, scores: np.ndarray,
                 config: DetectConfig) -> tuple[int, int, int, int]:
    """(above the WARNING level, WARNING, CRITICAL, above the CRITICAL level) counts of
    the decision rule on a stream of normal scores; the first and last count segments
    over the level whether or not k of n held."""
    over_warning = warnings = critical = above = 0
    for s in scores:
        above += float(s) > state.critical
        d = th.decide(state, float(s), config)
        state = d.state
        over_warning += d.above_warning
        warnings += d.status == th.WARNING
        critical += d.status == th.CRITICAL
    return over_warning, warnings, critical, above


def first_critical(state: th.ThresholdState, scores: np.ndarray, config: DetectConfig) -> int | None:
    """Index of the first CRITICAL of the decision rule on ``scores``, or None."""
    for k, s in enumerate(scores):
        d = th.decide(state, float(s), config)
        if d.status == th.CRITICAL:
            return k
        state = d.state
    return None


def developing(kind: str, fault: str, snr: float, segments: int) -> list[np.ndarray]:
    """A fault that grows over ``segments`` recordings of unit 0: recording k is its
    normal self plus (k + 1) / ``segments`` of what the fault adds to it (the faulty twin
    minus the normal one, from the same seed), then ``DEVELOPED_HOLD`` at full size."""
    audio = []
    for k in range(segments + DEVELOPED_HOLD):
        normal = clip(kind, 0, DEVELOP_SEED + k, snr)
        faulty = clip(kind, 0, DEVELOP_SEED + k, snr, fault)
        audio.append(normal + min(1.0, (k + 1) / segments) * (faulty - normal))
    return audio


def critical_per_week_bound(above: int, n: int, config: DetectConfig) -> tuple[float, float]:
    """(p, rate): the 95% upper bound (Clopper-Pearson) on the probability that a normal
    segment is over the CRITICAL level, from ``above`` of ``n``; and the false CRITICAL
    per week that the k-of-n rule gives at that p if segments were independent (this
    segment over and at least k - 1 of the n - 1 before it)."""
    from scipy.stats import beta, binom

    p = float(beta.ppf(0.95, above + 1, n - above))
    per_segment = p * float(binom.sf(config.alerts.k - 2, config.alerts.n - 1, p))
    return p, per_segment * SEGMENTS_PER_DAY * 7


def real_recordings(config: DetectConfig) -> str:
    """Calibrate on 7 machineA clips, test the 3 held out; also machineB as a check."""
    import soundfile as sf

    files = sorted(DCASE.glob("machineA_normal_*.wav"))
    if len(files) < 10:
        return "../shared/data/dcase2020 not found: real-recording check skipped."
    audio = [sf.read(f, dtype="float32")[0] for f in files]
    train, held = ours_features(audio[:7]), ours_features(audio[7:])
    state = fitted_levels(train, "machine", config)
    detector = fit_detector({"machine": train}, FEATURES, config)
    statuses = []
    for s in detector.score("machine", held):
        d = th.decide(state, float(s), config)
        state = d.state
        statuses.append(d.status)
    other = sf.read(DCASE / "machineB_normal_00.wav", dtype="float32")[0]
    other_score = float(detector.score("machine", ours_features([other]))[0])
    return (f"{config.scorer.kind}: held-out clips 07-09 scored {', '.join(statuses)} (WARNING above "
            f"{state.warning:.3g}, CRITICAL above {state.critical:.3g}); machineB_normal_00 (another machine) "
            f"scores {other_score:.3g}.")


def cold_start_seconds(train: dict[str, torch.Tensor], config: DetectConfig, mics: int = 4) -> float:
    """Wall time of `detect`'s cold start computation (cross-fit for the levels, then
    the final fit) on calibration segments of ``mics`` microphones x the sources of
    ``train`` (source -> (segments, 1, n_mels, n_frames)); microphone m hears each
    source ``m`` dB quieter."""
    n = min(len(x) for x in train.values())
    segments = [{(m, source): x[k] - float(m) for source, x in train.items() for m in range(mics)}
                for k in range(n)]
    began = time.monotonic()
    cross_fit(segments, lambda tensors: fit_detector(tensors, FEATURES, config), SCORERS[config.scorer.kind].cross_fit_folds)
    fit_detector(pooled(segments), FEATURES, config)
    return time.monotonic() - began


def detector_size(detector) -> int:
    """Bytes of the detector file as `detect` saves it (one source)."""
    with tempfile.TemporaryDirectory() as tmp:
        return save_detector(detector, Path(tmp) / "detector.pt").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=3, help="units per machine type, each with its own detector")
    parser.add_argument("--train", type=int, default=60, help="normal calibration recordings per unit and SNR")
    parser.add_argument("--test", type=int, default=20, help="normal and faulty test recordings per unit and condition")
    parser.add_argument("--stream", type=int, default=200, help="normal recordings streamed for false alarms")
    parser.add_argument("--develop", type=int, default=30,
                        help="recordings over which a developing fault grows to full size (time to CRITICAL)")
    parser.add_argument("--machines", default=",".join(FAULTS),
                        help="machine types, comma-separated (docs/benchmarks.md is written only with all)")
    parser.add_argument("--scorers", default=f"{DetectConfig().scorer.kind},autoencoder",
                        help="detect.scorer.kind values to compare, comma-separated; the first is the one "
                             "measured for false alarms and developing faults")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; on a busy shared machine 1 is faster)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = set(args.machines.split(",")) - set(FAULTS)
    if unknown:
        parser.error(f"--machines: unknown {', '.join(sorted(unknown))} (known: {', '.join(FAULTS)})")
    names = args.scorers.split(",")
    if set(names) - set(SCORERS):
        parser.error(f"--scorers: unknown {', '.join(sorted(set(names) - set(SCORERS)))} (known: {', '.join(SCORERS)})")
    configs = {name: DetectConfig(scorer=ScorerConfig(kind=name)) for name in names}
    lead = configs[names[0]]
    machines = {k: FAULTS[k] for k in args.machines.split(",")}
    began = time.monotonic()
    # (kind, fault, snr) -> per unit: {scorer: (AUC, pAUC)} with "dcase" for the baseline
    per_unit: dict[tuple[str, str, float], list[dict[str, tuple[float, float]]]] = {}
    alarms, score_ms, sizes, onsets = [], {n: [] for n in names}, [], []
    cold_train: dict[str, torch.Tensor] = {}
    for kind, faults in machines.items():
        for snr in SNRS:
            for unit in range(args.units):
                train_audio = [clip(kind, unit, TRAIN_SEED + k, snr) for k in range(args.train)]
                normal_audio = [clip(kind, unit, TEST_SEED + k, snr) for k in range(args.test)]
                train = ours_features(train_audio)
                if unit == 0 and snr == SNRS[0]:
                    cold_train[kind] = train
                normal = ours_features(normal_audio)
                detectors, normals = {}, {}
                for name, config in configs.items():
                    detectors[name] = fit_detector({kind: train}, FEATURES, config)
                    t0 = time.perf_counter()
                    normals[name] = detectors[name].score(kind, normal)
                    score_ms[name].append(1000 * (time.perf_counter() - t0) / len(normal))
                baseline = dcase_train(train_audio)
                base_normal = dcase_score(baseline, normal_audio)
                for fault in faults:
                    # The normal test recordings' twins, with the fault over the whole clip.
                    faulty_audio = [clip(kind, unit, TEST_SEED + k, snr, fault) for k in range(args.test)]
                    faulty = ours_features(faulty_audio)
                    row = {}
                    for name, detector in detectors.items():
                        scores = detector.score(kind, faulty)
                        row[name] = (auc(normals[name], scores), auc(normals[name], scores, 0.1))
                    base_fault = dcase_score(baseline, faulty_audio)
                    row["dcase"] = (auc(base_normal, base_fault), auc(base_normal, base_fault, 0.1))
                    per_unit.setdefault((kind, fault, snr), []).append(row)
                if unit == 0:
                    levels = fitted_levels(train, kind, lead)
                    detector = detectors[names[0]]
                    stream = ours_features([clip(kind, unit, STREAM_SEED + k, snr) for k in range(args.stream)])
                    alarms.append((kind, snr, *false_alarms(levels, detector.score(kind, stream), lead)))
                    sizes.append(detector_size(detector))
                    for fault in faults:
                        grown = detector.score(kind, ours_features(developing(kind, fault, snr, args.develop)))
                        onsets.append((kind, fault, snr, first_critical(levels, grown, lead)))
                print(f"{kind} {snr:+g} dB unit {unit} done ({time.monotonic() - began:.0f} s)", flush=True)

    columns = names + ["dcase"]
    rows = [(kind, fault, snr, {c: (float(np.mean([u[c][0] for u in v])), float(np.mean([u[c][1] for u in v])),
                                    min(u[c][0] for u in v)) for c in columns})
            for (kind, fault, snr), v in per_unit.items()]
    mean = {c: (float(np.mean([r[3][c][0] for r in rows])), float(np.mean([r[3][c][1] for r in rows])))
            for c in columns}
    table = "\n".join(f"| {k} | {f} | {s:+g} dB | " + " | ".join(f"{m[c][0]:.3f} ({m[c][2]:.2f}) / {m[c][1]:.3f}"
                                                                  for c in columns) + " |"
                      for k, f, s, m in rows)
    means = " | ".join(f"**{mean[c][0]:.3f}** / **{mean[c][1]:.3f}**" for c in columns)
    ratios = ", ".join(f"{mean[names[0]][0] / mean[c][0]:.2f}x {c}" for c in columns[1:])
    alarm_table = "\n".join(
        f"| {k} | {s:+g} dB | {o} | {w} ({w / args.stream * SEGMENTS_PER_DAY:.0f}/day) | {a} | "
        f"{c} ({c / args.stream * SEGMENTS_PER_DAY:.0f}/day) |"
        for k, s, o, w, c, a in alarms)
    total_over = sum(o for _, _, o, *_ in alarms)
    total_warning = sum(w for _, _, _, w, _, _ in alarms)
    total_critical = sum(c for _, _, _, _, c, _ in alarms)
    total_above = sum(a for *_, a in alarms)
    streamed = args.stream * len(alarms)
    days = streamed / SEGMENTS_PER_DAY
    p_bound, week_bound = critical_per_week_bound(total_above, streamed, lead)
    onset_table = "\n".join(f"| {k} | {f} | {s:+g} dB | " + (f"{(i + 1) * 10 / 60:.1f} min (segment {i + 1}, fault at "
                                                              f"{100 * min(1.0, (i + 1) / args.develop):.0f}%)"
                                                              if i is not None else
                                                              f"not within {args.develop + DEVELOPED_HOLD} segments")
                            + " |" for k, f, s, i in onsets)
    caught = [i for *_, i in onsets if i is not None]
    # The default's only: the autoencoder's would take most of an hour here (three trainings per source).
    cold_text = f"{names[0]} {cold_start_seconds(cold_train, lead):.1f} s" if cold_train else "not measured"
    met = mean[names[0]][0] >= 0.954
    alerts = lead.alerts
    body = f"""## Anomaly detection (scripts/bench_detection.py)

`simulate` recordings of one machine in factory background, watched as the product
watches it: {args.units} units per machine type (each its own design, speed, vane/blade/slot
count and room), and per unit and SNR a detector calibrated on {args.train} normal recordings of
that unit (the product's 10 minutes), tested on {args.test} later normal recordings and their
faulty twins (the same recording with the fault over the whole clip). Recordings of a
unit differ in speed and load drift, noise, background level and events. signalcraft:
`detect.scorers.fit_detector` with `DetectConfig(scorer=ScorerConfig(kind=...))` for each of
{", ".join(f"`{n}`" for n in names)} (`{DetectConfig().scorer.kind}` is the default: members
{", ".join(DetectConfig().scorer.members)}), on the 1x240x240 log-mels the chain exports.
Baseline: DCASE 2020 Task 2 dense autoencoder (128 mels, 5 frames, 640-128x4-8-128x4-640), 30
epochs on the same recordings. AUC and pAUC(0.1) are per unit (each unit has its own
detector and score scale), averaged over the units; in brackets the worst unit's AUC. Run
time {(time.monotonic() - began) / 60:.1f} min.

| machine | fault | SNR | {" | ".join(f"{c} AUC (worst unit) / pAUC(0.1)" for c in columns)} |
|---|---|---|{"---|" * len(columns)}
{table}
| **mean** | | | {means} |

Mean AUC of `{names[0]}` as a ratio: {ratios}.

**False alarms** of the full decision rule with `{names[0]}` (levels fitted as `detect` does,
on {SCORERS[names[0]].cross_fit_folds}-fold cross-fitted calibration scores; WARNING needs
{alerts.warning_k} of {alerts.warning_n} above the WARNING level, CRITICAL {alerts.k} of {alerts.n} above the
CRITICAL level or the CUSUM past {alerts.cusum_limit}) on {args.stream} further normal
recordings of the first unit per row, and the rate per day of 10 s segments that count
implies. The WARNING level is the {lead.levels.warning_quantile:g} quantile, so about
{100 * (1 - lead.levels.warning_quantile):.0f}% of normal segments are expected above it; here {total_over} of
{streamed} ({100 * total_over / streamed:.1f}%), and {total_warning} WARNING.

| machine | SNR | over the WARNING level | WARNING | over the CRITICAL level | CRITICAL |
|---|---|---|---|---|---|
{alarm_table}

{total_critical} false CRITICAL in {streamed} normal segments ({days:.1f} simulated days:
{total_critical / days:.2g} per day). A week is {SEGMENTS_PER_DAY * 7:.0f} segments per machine, more
than can be simulated here: {total_above} of the {streamed} were over the CRITICAL level, so the
chance that a normal segment is over it is at most {p_bound:.2g} (95% upper bound); at that
chance, with independent segments, {alerts.k} of {alerts.n} gives at most {week_bound:.2g} false
CRITICAL per week ({week_bound / 7:.2g} per day).

**Developing faults**, `{names[0]}`: after calibration, unit 0 of each machine type records a
fault that grows over {args.develop} segments ({args.develop * 10 / 60:.0f} min) from nothing to its full
size (segment k: the normal recording plus k/{args.develop} of what the fault adds to it), then stays
at full size for {DEVELOPED_HOLD} more. Time from the onset to the first CRITICAL:

| machine | fault | SNR | first CRITICAL |
|---|---|---|---|
{onset_table}

{len(caught)} of {len(onsets)} developing faults raised CRITICAL, median
{statistics.median([(i + 1) * 10 / 60 for i in caught]) if caught else float("nan"):.1f} min after the onset.

**Cold start**: `detect`'s computation when calibration completes (the cross-fit for the
levels and the final fit) for {args.train} segments x 4 microphones x {len(cold_train)} sources, here on
{torch.get_num_threads()} torch threads: {cold_text}.

Detector file {statistics.median(sizes) / 1e6:.2f} MB per source (`{names[0]}`); scoring
{", ".join(f"{n} {statistics.median(v):.1f} ms" for n, v in score_ms.items())} per tensor (median).

Real normal recordings (DCASE 2020 dev, machineA; calibrated on clips 00-06):
{real_recordings(lead)}

Target: mean AUC not below the earlier default's 0.954 (here {mean[names[0]][0]:.3f}:
{"met" if met else "NOT met"}).
"""
    print(body)
    if set(machines) == set(FAULTS):
        print(f"written to {write_section('bench_detection', body)}")
    else:
        print("some machine types only: docs/benchmarks.md not written")


if __name__ == "__main__":
    main()
