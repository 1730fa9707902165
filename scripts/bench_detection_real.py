"""Anomaly detection on real recordings, run as a plant engineer runs signalcraft.

Data: the real DCASE 2020 Task 2 slide-rail recordings in ../shared/data/dcase2020_slider
(machine ids 00 and 02; MIMII dataset, Hitachi, Ltd., CC BY-SA 4.0) and the real normal
recordings of machineA in ../shared/data/dcase2020. Nothing is copied into the project;
without those folders the benchmark says so and stops.

For each slider id and each scorer kind (``detect.scorer.kind``), through the installed
``signalcraft`` command, exactly as in production:

1. ``signalcraft process`` the first 50 normal clips (sorted by name), then
   ``signalcraft detect`` cold-starts: it takes them as calibration, trains the
   detector, cross-fits and sets the levels (``detect.calibration_segments: 50``);
2. two streams, each into its own copy of the calibrated project, as two rails would
   run on from calibration: the healthy rail (the other 50 normals, in time order) and
   the faulty rail (the 100 real anomalies, in one seeded shuffled order); each file
   is dated 10 s after the previous one, so segments follow that order. ``signalcraft
   process`` and ``signalcraft detect --csv`` score each stream with the full decision
   rule (k of n, CUSUM, adaptation from NORMAL scores); and once more each with the
   CUSUM off. A stream is one machine: a rail that runs faulty does not turn healthy
   from one 10 s clip to the next, so normals are not mixed into the faulty stream,
   where an accumulating rule would carry the faulty clips' evidence over to them.

From the CSVs: AUC and pAUC(0.1) of the scores (healthy against faulty), anomalies and
normals flagged (WARNING or CRITICAL), the position of the first CRITICAL in the
faulty stream, and the wall time of the cold start. Side by side, on exactly the
same split: the DCASE 2020 baseline re-implemented (scripts/bench_detection.py), and two
simple references computed on the very tensors signalcraft exported: a shrunk
(Ledoit-Wolf) Mahalanobis distance on each band's mean and standard deviation over
frames, and the mean over frames of each frame's distance to its nearest calibration
frame. machineA: calibrate on clips 00-06, then clips 07-09 must raise no alarm.

    python scripts/bench_detection_real.py [--scorers ensemble,autoencoder] [--members profile,modulation,flux]

``--members`` sets the ensemble's ``detect.scorer.members`` (default: the product's);
docs/benchmarks.md is written only for every scorer with the default members.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import yaml

from bench_detection import auc, dcase_score, dcase_train
from benchlib import ROOT, write_section
from signalcraft.config import DetectConfig
from signalcraft.detect.scorers import SCORERS
from signalcraft.segments import list_segments

SHARED = ROOT.parent / "shared" / "data"
SLIDER = SHARED / "dcase2020_slider"
MACHINE_A = SHARED / "dcase2020"
CALIBRATION = 50
SIGNALCRAFT = [sys.executable, "-m", "signalcraft"]
# Published full-data (about 1,000 training clips) DCASE 2020 baseline AUC per slider id.
PUBLISHED = {"id_00": 0.9633, "id_02": 0.7881}


def run(config: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*SIGNALCRAFT, "--config", str(config), *args], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode not in (0, 3, 4):
        sys.exit(f"signalcraft {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def staged(files: list[Path], folder: Path, start: float) -> list[Path]:
    """Links to ``files`` in ``folder``, dated so that `process` gives them consecutive
    start times in this order."""
    folder.mkdir(parents=True)
    out = []
    for k, f in enumerate(files):
        link = folder / f"{k:04d}_{f.name}"
        shutil.copyfile(f, link)
        t = start + 10.0 * (k + 1)  # process dates a file by its modification time minus its length
        os.utime(link, (t, t))
        out.append(link)
    return out


def project(work: Path, scorer: str, calibration: int, members: list[str] | None = None) -> Path:
    config = work / "config.yaml"
    chosen = {"kind": scorer, **({"members": list(members)} if members and scorer == "ensemble" else {})}
    config.write_text(yaml.safe_dump({
        "capture": {"channels": [1]}, "denoise": {"enabled": False}, "output": {"dir": "out"},
        "detect": {"calibration_segments": calibration, "model": "detector.pt", "scorer": chosen},
        "log": {"file": None},
    }))
    return config


def tensors(output: Path, names: set[str] | None = None) -> torch.Tensor:
    chosen = [s for s in list_segments(output) if names is None or s.name in names]
    return torch.stack([s.load_tensor(0, "mix") for s in chosen])


def references(train: torch.Tensor, normal: torch.Tensor, anomaly: torch.Tensor) -> dict[str, float]:
    from sklearn.covariance import LedoitWolf
    from sklearn.neighbors import NearestNeighbors

    stats = lambda x: torch.cat([x[:, 0].mean(-1), x[:, 0].std(-1)], 1).double().numpy()  # noqa: E731
    gauss = LedoitWolf().fit(stats(train))
    frames = lambda x: x[:, 0].transpose(1, 2).reshape(-1, x.shape[2]).double().numpy()  # noqa: E731
    nn = NearestNeighbors(n_neighbors=1).fit(frames(train))
    knn = lambda x: nn.kneighbors(frames(x))[0].reshape(len(x), -1).mean(1)  # noqa: E731
    return {"band mean+std Mahalanobis": auc(gauss.mahalanobis(stats(normal)), gauss.mahalanobis(stats(anomaly))),
            "frame 1-NN": auc(knn(normal), knn(anomaly))}


def label(scorer: str, members: list[str] | None) -> str:
    """The scorer's name in the table: an ensemble of other than the default members
    names them."""
    return f"ensemble ({'+'.join(members)})" if scorer == "ensemble" and members else scorer


def stream(calibrated: Path, work: Path, files: list[Path], start: float) -> dict[bool, list[dict]]:
    """`detect --csv` rows of ``files`` processed, in this order, into a copy of the
    calibrated project ``calibrated`` (one machine's stream from the calibrated state):
    {True: with the full decision rule, False: with the CUSUM off (the k-of-n rule
    alone, on a copy of the processed project)}."""
    shutil.copytree(calibrated, work, ignore=shutil.ignore_patterns("train"))
    config = work / "config.yaml"
    run(config, "process", *map(str, staged(files, work / "test", start)))
    alone = work.with_name(work.name + "-k_of_n")
    shutil.copytree(work, alone, ignore=shutil.ignore_patterns("test"))
    settings = yaml.safe_load(config.read_text())
    settings["detect"]["alerts"] = {"cusum_limit": None}
    (alone / "config.yaml").write_text(yaml.safe_dump(settings))
    rows = {cusum: list(csv.DictReader(io.StringIO(run(folder / "config.yaml", "detect", str(folder / "out"),
                                                       "--csv").stdout)))
            for cusum, folder in ((True, work), (False, alone))}
    # Both read the same segments, one row per file (one microphone, no separation).
    assert len(rows[True]) == len(files) and [r["folder"] for r in rows[True]] == [r["folder"] for r in rows[False]]
    return rows


def flagged(rows: list[dict]) -> np.ndarray:
    return np.array([r["status"] in ("WARNING", "CRITICAL") for r in rows])


def first_critical(rows: list[dict]) -> int | None:
    """1-based position of the first CRITICAL row, or None."""
    return next((k + 1 for k, r in enumerate(rows) if r["status"] == "CRITICAL"), None)


def slider(mid: str, scorers: list[str], seed: int, members: list[str] | None = None) -> dict:
    """Per scorer: calibrate on the first 50 normals, then two streams from that state:
    the healthy rail (the other normals, in time order) and the faulty rail (the
    anomalies, in one seeded shuffled order)."""
    normals = sorted((SLIDER / mid / "normal").glob("*.flac"))
    anomalies = sorted((SLIDER / mid / "anomaly").glob("*.flac"))
    train_files, test_normal = normals[:CALIBRATION], normals[CALIBRATION:]
    faulty = [anomalies[k] for k in np.random.default_rng(seed).permutation(len(anomalies))]
    out: dict = {"scorers": {}}
    for scorer in scorers:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / "calibrated"
            work.mkdir()
            config = project(work, scorer, CALIBRATION, members)
            base = time.time() - 10 * (len(train_files) + max(len(test_normal), len(faulty)) + 10)
            run(config, "process", *map(str, staged(train_files, work / "train", base)))
            began = time.monotonic()
            run(config, "detect", str(work / "out"))
            cold = time.monotonic() - began
            calibration_names = {s.name for s in list_segments(work / "out")}
            after = base + 10 * (len(train_files) + 5)
            rows = {(kind, cusum): found for kind, files in (("healthy", test_normal), ("faulty", faulty))
                    for cusum, found in stream(work, Path(tmp) / kind, files, after).items()}
            normal_scores = np.array([float(r["score"]) for r in rows["healthy", True]])
            anomaly_scores = np.array([float(r["score"]) for r in rows["faulty", True]])
            out["scorers"][label(scorer, members)] = {
                "auc": auc(normal_scores, anomaly_scores), "pauc": auc(normal_scores, anomaly_scores, 0.1),
                "anomalies_flagged": int(flagged(rows["faulty", True]).sum()),
                "normals_flagged": int(flagged(rows["healthy", True]).sum()),
                "n_anomalies": len(faulty), "n_normals": len(test_normal), "cold_start_s": cold,
                "anomalies_flagged_k_of_n": int(flagged(rows["faulty", False]).sum()),
                "normals_flagged_k_of_n": int(flagged(rows["healthy", False]).sum()),
                "first_critical": first_critical(rows["faulty", True]),
            }
            if "refs" not in out:  # the same tensors whatever the scorer
                train = tensors(work / "out", calibration_names)
                test = {kind: tensors(Path(tmp) / kind / "out", {r["folder"] for r in rows[kind, True]})
                        for kind in ("healthy", "faulty")}
                out["refs"] = references(train, test["healthy"], test["faulty"])
        print(f"{mid} {label(scorer, members)}: {out['scorers'][label(scorer, members)]}", flush=True)
    audio = lambda files: [sf.read(f, dtype="float32")[0] for f in files]  # noqa: E731
    baseline = dcase_train(audio(train_files))
    out["refs"]["DCASE 2020 baseline (same 50 clips)"] = auc(dcase_score(baseline, audio(test_normal)),
                                                             dcase_score(baseline, audio(anomalies)))
    return out


def machine_a(scorer: str, members: list[str] | None = None) -> str:
    files = sorted(MACHINE_A.glob("machineA_normal_*.wav"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = project(work, scorer, 7, members)
        base = time.time() - 1000
        run(config, "process", *map(str, staged(files[:7], work / "train", base)))
        run(config, "detect", str(work / "out"))
        run(config, "process", *map(str, staged(files[7:10], work / "test", base + 100)))
        rows = list(csv.DictReader(io.StringIO(run(config, "detect", str(work / "out"), "--csv").stdout)))
    return ", ".join(r["status"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scorers", default=",".join(SCORERS), help="detect.scorer.kind values to compare, comma-separated")
    parser.add_argument("--members", default=None,
                        help="detect.scorer.members of the ensemble, comma-separated (default: the product's)")
    parser.add_argument("--seed", type=int, default=0, help="order of the test clips")
    args = parser.parse_args()
    scorers = args.scorers.split(",")
    members = args.members.split(",") if args.members else None
    if not (SLIDER / "id_00").is_dir() or not MACHINE_A.is_dir():
        sys.exit(f"the real recordings are not there ({SLIDER}, {MACHINE_A}): nothing to measure. They are not "
                 "part of the project; this benchmark reads them from ../shared/data.")
    began = time.monotonic()
    results = {mid: slider(mid, scorers, args.seed, members) for mid in ("id_00", "id_02")}
    machine = {label(s, members): machine_a(s, members) for s in scorers}
    ref_names = list(results["id_00"]["refs"])
    lines = []
    for mid, r in results.items():
        best_ref = max(v for k, v in r["refs"].items() if "DCASE" not in k)
        for scorer, m in r["scorers"].items():
            met = m["auc"] >= PUBLISHED[mid] and m["auc"] >= best_ref + 0.03
            flags = m["anomalies_flagged"] >= 0.6 * m["n_anomalies"] and m["normals_flagged"] <= 0.02 * m["n_normals"]
            lines.append(
                f"| {mid} | {scorer} | {m['auc']:.3f} / {m['pauc']:.3f} | {m['anomalies_flagged']} of "
                f"{m['n_anomalies']} | {m['normals_flagged']} of {m['n_normals']} | "
                f"{m['anomalies_flagged_k_of_n']} / {m['normals_flagged_k_of_n']} | "
                f"{'clip ' + str(m['first_critical']) if m['first_critical'] else 'none'} | {m['cold_start_s']:.0f} s | "
                + " | ".join(f"{r['refs'][k]:.3f}" for k in ref_names)
                + f" | {PUBLISHED[mid]:.3f} | {'yes' if met else 'no'} / {'yes' if flags else 'no'} |")
    alerts = DetectConfig().alerts
    body = f"""## Detection on real recordings (scripts/bench_detection_real.py)

Real slide rails with real faults (DCASE 2020 Task 2 development data, MIMII dataset,
Hitachi, Ltd., CC BY-SA 4.0), run through the `signalcraft` command as in production:
`process` the first {CALIBRATION} normal clips of an id, `detect` cold-starts on them; then
from that calibrated state, two streams, each into its own copy of the project: the
healthy rail (the other 50 normals, in time order) and the faulty rail (the 100 real
anomalies, one seeded shuffled order), each through `process` and `detect --csv`.
Flagged: WARNING or CRITICAL by the full decision rule (WARNING: {alerts.warning_k} of the last
{alerts.warning_n} clips above the WARNING level; CRITICAL: {alerts.k} of {alerts.n} above the CRITICAL
level, or the CUSUM). First CRITICAL: the position in
the faulty stream of its first CRITICAL clip. The references
were computed in the same run on the same split ({CALIBRATION} normal clips seen; the
published baseline saw about 1,000). Cold start: wall time of the first `detect`
(training, cross-fitting, levels). The ensemble's members: {', '.join(members or DetectConfig().scorer.members)}.
Run time {(time.monotonic() - began) / 60:.1f} min.

| id | scorer | AUC / pAUC(0.1) | anomalies flagged | normals flagged | k of n alone: anomalies / normals flagged | first CRITICAL | cold start | {' | '.join(ref_names)} AUC | published baseline AUC | AUC target / alert target met |
|---|---|---|---|---|---|---|---|{'---|' * len(ref_names)}---|---|
{chr(10).join(lines)}

AUC target: at least the published full-data baseline and at least the best simple
reference + 0.03. Alert target: at least 60% of anomalies flagged with at most 2% of
normals flagged. "k of n alone": the same calibrated detector and stream with
`detect.alerts.cusum_limit: null`: what the k-of-n rules flag, without the evidence the
CUSUM accumulates over a faulty stream.

machineA (real normal recordings): calibrated on clips 00-06; clips 07-09 scored
{'; '.join(f'{s}: {v}' for s, v in machine.items())} (no alarm wanted).
"""
    print(body)
    if set(scorers) == set(SCORERS) and members is None:
        print(f"written to {write_section('bench_detection_real', body)}")


if __name__ == "__main__":
    main()
