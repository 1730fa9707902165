"""The edge exports against torch, side by side in one run: size, speed and agreement.

Artifacts, each exported by the product's own ``edge.export`` and run by its own
``edge.runtime`` (what `signalcraft export-onnx` and `compute.runtime: onnxruntime` run):

- the detector of the default kind (``detect.scorer.kind``) and the ``autoencoder``
  kind (the one with convolutions to quantise), fitted as `detect` fits them
  (``scorers.fit_detector``) on the first 50 normal clips of each real slider id in
  ../shared/data/dcase2020_slider (DCASE 2020 Task 2, MIMII dataset, Hitachi, Ltd.,
  CC BY-SA 4.0), and scored on the other 50 normals and the 100 real anomalies: the
  AUC of torch, ONNX Runtime FP32 and INT8 on the same tensors, the largest relative
  score difference from torch, and the latency per tensor (median of single-tensor calls);
- the bundled separators (models/separator: ``plant`` per microphone, ``plant_array``
  for 4 microphones): latency per 10 s channel through the product's ``Separator`` on
  torch and on onnxruntime (median of runs), and the largest difference from torch.

The log-mel tensors are the product's (``features.LogMel`` with the default settings, no
denoising: the recordings are single-microphone clips without a room-noise clip).
Without the real recordings the benchmark says so and stops.

    python scripts/bench_edge.py [--runs 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from bench_detection import auc
from benchlib import ROOT, write_section
from signalcraft.config import DetectConfig, FeaturesConfig, ScorerConfig, SeparationConfig
from signalcraft.detect.model import load_detector, save_detector
from signalcraft.detect.scorers import fit_detector
from signalcraft.edge.export import export_detector, export_separator
from signalcraft.edge.runtime import OnnxScorer
from signalcraft.features import LogMel
from signalcraft.separate import load_separator, model_file

SLIDER = ROOT.parent / "shared" / "data" / "dcase2020_slider"
MODELS = ROOT / "models" / "separator"
SR = 16000
CALIBRATION = 50


def slider_tensors(machine: Path) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(calibration, test, test is anomaly) log-mel tensors of one slider id."""
    logmel = LogMel(FeaturesConfig(), SR, 10 * SR)
    normal = sorted((machine / "normal").glob("*.flac"))
    anomaly = sorted((machine / "anomaly").glob("*.flac"))

    def of(files):
        return torch.stack([logmel(sf.read(f, dtype="float32")[0][:10 * SR])[None] for f in files])

    test = of(normal[CALIBRATION:] + anomaly)
    return of(normal[:CALIBRATION]), test, np.r_[np.zeros(len(normal) - CALIBRATION), np.ones(len(anomaly))] > 0


def latency(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def detector_rows(kind: str, work: Path, data: dict, runs: int) -> list[str]:
    rows = []
    for machine, (calibration, test, is_anomaly) in data.items():
        config = DetectConfig(scorer=ScorerConfig(kind=kind))
        began = time.monotonic()
        path = save_detector(fit_detector({"mix": calibration}, {"kind": "log-mel"}, config),
                             work / f"{kind}-{machine}.pt")
        detector = load_detector(path)
        fit_s = time.monotonic() - began
        report = export_detector(detector, path, {"mix": calibration})
        files = report["sources"]["mix"]["files"]
        torch_scores = detector.score("mix", test)
        one = test[:1]
        results = {"torch": (torch_scores, latency(lambda: detector.score("mix", one), runs * 10), path.stat().st_size)}
        for precision in files:
            onnx = OnnxScorer(path, precision)
            scores = onnx.score("mix", test.numpy())
            results[f"onnx {precision}"] = (scores, latency(lambda: onnx.score("mix", one.numpy()), runs * 10),
                                            files[precision]["bytes"])
        base = auc(torch_scores[~is_anomaly], torch_scores[is_anomaly])
        for name, (scores, seconds, size) in results.items():
            a = auc(scores[~is_anomaly], scores[is_anomaly])
            diff = float(np.max(np.abs(scores - torch_scores) / np.maximum(np.abs(torch_scores), 1e-9)))
            bound = {"torch": None, "onnx fp32": 0.005, "onnx int8": 0.02}[name]
            verdict = "" if bound is None else ("yes" if abs(a - base) <= bound else "NO")
            rows.append(f"| {kind} | {machine} | {name} | {size / 1e6:.2f} MB | {1e3 * seconds:.2f} ms | "
                        f"{a:.4f} | {a - base:+.4f} | {diff:.2g} | {verdict} |")
        if "int8" not in files:
            rows.append(f"| {kind} | {machine} | onnx int8 | not written: nothing in its graph quantises (computed "
                        "in float64) | | | | | |")
        print(f"{kind} {machine}: fitted in {fit_s:.1f} s", file=sys.stderr)
    return rows


def separator_rows(work: Path, runs: int) -> list[str]:
    rows = []
    rng = np.random.default_rng(0)
    clips = sorted((ROOT.parent / "shared" / "data" / "dcase2020").glob("machine*_normal_*.wav"))
    for name, mics in (("plant", 1), ("plant_array", 4)):
        try:
            source = model_file(MODELS, name)
        except Exception as e:  # the bundled model is not there
            rows.append(f"| {name} | not measured: {e} | | | | |")
            continue
        repo = work / name
        repo.mkdir()
        shutil.copy(source, repo / source.name)
        if len(clips) >= mics:
            audio = np.stack([sf.read(f, dtype="float32")[0][:10 * SR] for f in clips[:mics]])
        else:
            audio = (0.05 * rng.standard_normal((mics, 10 * SR))).astype(np.float32)
        report = export_separator(repo / source.name, audio[None])
        config = SeparationConfig(repo=repo, model=name, device="cpu")
        seps = {"torch": load_separator(config, SR)}
        seps.update({f"onnx {p}": load_separator(config, SR, "onnxruntime", p) for p in report["files"]})
        expected = seps["torch"](audio)
        rms = float(np.sqrt(np.mean(expected ** 2)))
        for runtime, sep in seps.items():
            seconds = latency(lambda: sep(audio), runs)
            size = (repo / source.name).stat().st_size if runtime == "torch" else \
                report["files"][runtime.split()[1]]["bytes"]
            diff = float(np.max(np.abs(sep(audio) - expected))) / rms
            rows.append(f"| {name} ({mics} mic{'s' * (mics > 1)}) | {runtime} | {size / 1e6:.2f} MB | "
                        f"{1e3 * seconds / mics:.0f} ms | {diff:.2g} |")
        for precision, reason in report["refused"].items():
            rows.append(f"| {name} ({mics} mic{'s' * (mics > 1)}) | onnx {precision} | not kept: {reason} | | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per latency (x10 for a tensor)")
    args = parser.parse_args()
    if not (SLIDER / "id_00").is_dir():
        sys.exit(f"the real recordings are not there ({SLIDER}): nothing to measure. They are not part of the "
                 "project; this benchmark reads them from ../shared/data.")
    torch.set_num_threads(2)
    began = time.monotonic()
    data = {m.name: slider_tensors(m) for m in sorted(SLIDER.glob("id_*"))}
    work = Path(tempfile.mkdtemp(prefix="signalcraft-bench-edge-"))
    default = ScorerConfig().kind
    detector = detector_rows(default, work, data, args.runs) + detector_rows("autoencoder", work, data, args.runs)
    separator = separator_rows(work, args.runs)
    shutil.rmtree(work, ignore_errors=True)
    body = f"""## Edge export: ONNX Runtime and INT8 against torch (scripts/bench_edge.py)

Each artifact exported by `edge.export` (as `signalcraft export-onnx` does) and run by
`edge.runtime` (as `compute.runtime: onnxruntime` does), beside torch in the same run.
Detectors: fitted by `scorers.fit_detector` on the first {CALIBRATION} normal clips of each
real slider id (DCASE 2020 Task 2, MIMII dataset, Hitachi, Ltd., CC BY-SA 4.0), scored on
the other 50 normals and the 100 real anomalies; latency: one tensor per call, median of
{10 * args.runs} calls. Separators: the bundled models on 10 s of the DCASE 2020 machine
clips per microphone, through `Separator`, median of {args.runs} runs, per microphone.
torch threads 2; ONNX Runtime's own thread pool (2 cores). Run time
{(time.monotonic() - began) / 60:.1f} min.

| scorer | id | runtime | size | latency per tensor | AUC | AUC - torch | largest relative score difference | AUC within bound (0.005 FP32, 0.02 INT8) |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(detector)}

| separator | runtime | size | time per 10 s microphone | largest difference from torch (of the output's RMS) |
|---|---|---|---|---|
{chr(10).join(separator)}
"""
    print(body)
    print(f"written to {write_section('bench_edge', body)}")


if __name__ == "__main__":
    main()
