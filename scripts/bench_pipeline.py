"""Time to process one 8-channel, 10 s, 16 kHz segment: signalcraft's chain on torch and on
ONNX Runtime against the prototype's sequential per-channel loop, side by side in one run.

All use the same 4-source Demucs model (the bundled per-microphone model
models/separator/plant when present, else the separator's default architecture with
random weights, which do not change the cost), the same audio and the same noise clips,
and all write their tensors to disk.

- signalcraft: `chain.Chain` as `record` runs it: torch spectral gating per channel,
  the separator over all channels (each channel's segment in one pass, the default
  `separation.segment: whole`; `compute.runtime: torch`: demucs' `apply_model`;
  `onnxruntime`: the model's export from `edge.export`), one torchaudio log-mel over
  all (channel, source) pairs, atomic export.
- prototype: for each channel in turn: `noisereduce.reduce_noise` (numpy, stationary,
  the channel's clip), `apply_model` on that channel, a librosa mel per source, save.

Then the resident memory (peak RSS) of `signalcraft record --repeat 2` on each runtime,
8 channels from a virtual ALSA device replaying the same audio.

Audio: the DCASE 2020 clips in ../shared/data/dcase2020 as eight microphones when
present, else synthetic machine noise.

    python scripts/bench_pipeline.py [--runs 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from benchlib import ROOT, write_section
from signalcraft.capture import Segment
from signalcraft.config import config_from_dict
from signalcraft.noise import NoiseClip, save_clip
from signalcraft.chain import Chain
from signalcraft.config import SeparationConfig, TrainSeparatorConfig
from signalcraft.edge.export import export_separator
from signalcraft.separate import model_file, read_model, save_model
from signalcraft.training.separator import build_model

SR = 16000  # Hz
MICS = 8
SECONDS = 10.0
SOURCES = ["pump", "fan", "motor", "valve"]
DCASE = ROOT.parent / "shared" / "data" / "dcase2020"


def separator_model() -> tuple[torch.nn.Module, str]:
    """The bundled per-microphone separator, else the default architecture with random
    weights; and which it is."""
    try:
        path = model_file(ROOT / "models" / "separator", "plant")
        return read_model(path), f"the bundled model {path.name}"
    except Exception:
        torch.manual_seed(0)
        return build_model(TrainSeparatorConfig(), tuple(SOURCES), SR), "the default architecture, random weights"


def record_peak_rss_mb(work: Path, config_text: str, audio: np.ndarray, runtime: str) -> float:
    """Peak resident memory of `signalcraft record --repeat 2` on ``runtime``, MB."""
    from signalcraft import vdevice

    folder = work / f"record-{runtime}"
    folder.mkdir()
    env = {**os.environ, **vdevice.install(folder / "device", MICS, SR)}
    vdevice.set_samples(folder / "device", vdevice.to_int16(np.tile(audio, 4) / max(1.0, np.abs(audio).max())))
    config = folder / "config.yaml"
    config.write_text(config_text.replace("RUNTIME", runtime).replace("OUT", str(folder / "out")))
    signalcraft = [sys.executable, "-m", "signalcraft", "--config", str(config)]
    subprocess.run([*signalcraft, "calibrate-noise", "--force"], env=env, check=True, capture_output=True)
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    result = subprocess.run([sys.executable, "-c", probe, *signalcraft, "record", "--repeat", "2"], env=env,
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"record on {runtime} failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def audio_and_clips(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray], str]:
    """(MICS, samples) audio, one noise clip per mic, and where they came from."""
    n = round(SECONDS * SR)
    files = sorted(DCASE.glob("machine*_normal_*.wav"))
    if len(files) >= MICS:
        audio = np.stack([sf.read(f, dtype="float32")[0][:n] for f in files[:MICS]])
        source = f"DCASE 2020 clips {files[0].name} .. {files[MICS - 1].name} as {MICS} microphones"
    else:
        t = np.arange(n) / SR
        audio = np.stack([0.05 * np.sin(2 * np.pi * (100 + 20 * k) * t) + 0.02 * rng.standard_normal(n)
                          for k in range(MICS)]).astype(np.float32)
        source = "synthetic tones in noise (../shared/data/dcase2020 not found)"
    clips = [(0.02 * rng.standard_normal(5 * SR)).astype(np.float32) for _ in range(MICS)]
    return audio.astype(np.float32), clips, source


def prototype_loop(audio, clips, model, out: Path, hop: int) -> None:
    """The seed prototype: record, then channel after channel."""
    import librosa
    import noisereduce as nr
    from demucs.apply import apply_model

    for mic in range(audio.shape[0]):
        clean = nr.reduce_noise(y=audio[mic], sr=SR, y_noise=clips[mic], stationary=True)
        with torch.no_grad():
            sources = apply_model(model, torch.from_numpy(clean.astype(np.float32))[None, None], split=True,
                                  overlap=0.25)[0, :, 0].numpy()
        (out / f"mic_{mic}").mkdir(parents=True, exist_ok=True)
        for name, signal in zip(SOURCES, sources):
            mel = librosa.feature.melspectrogram(y=signal, sr=SR, n_fft=2048, hop_length=hop, n_mels=240)
            db = librosa.power_to_db(mel, ref=1.0)[:, :240]
            torch.save(torch.from_numpy(db)[None].float(), out / f"mic_{mic}" / f"{name}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (after one warm-up)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    audio, clips, source = audio_and_clips(rng)
    work = Path(tempfile.mkdtemp(prefix="signalcraft-bench-pipeline-"))
    for k, clip in enumerate(clips):
        save_clip(NoiseClip(clip, SR, k + 1, "bench", dt.datetime.now(dt.timezone.utc)), work / "noise")
    bundled, which = separator_model()
    torch.manual_seed(0)
    wide = build_model(TrainSeparatorConfig(channels=32), tuple(SOURCES), SR)
    models = {"default": (bundled.eval(), which),
              "32-channel": (wide.eval(), "the default architecture at 32 channels, random weights")}
    segment = Segment(audio=audio, sample_rate=SR, start_time=dt.datetime.now(dt.timezone.utc), start_frame=0,
                      device="bench", channels=tuple(range(1, MICS + 1)))
    times: dict[tuple[str, str], list[float]] = {}
    chains, exports = {}, {}
    for label, (model, _) in models.items():
        repo = work / "models" / label.replace(" ", "-")
        save_model(model, repo, "bench")
        exports[label] = export_separator(model_file(repo, "bench"), audio[:2, None, :], int8=False)
        settings = {
            "capture": {"channels": list(range(1, MICS + 1))},
            "noise": {"dir": str(work / "noise")},
            "separation": {"repo": str(repo), "model": "bench"},
            "output": {"dir": str(work / "out")},
        }
        for runtime in ("torch", "onnxruntime"):
            chains[label, runtime] = Chain(config_from_dict({**settings, "compute": {"runtime": runtime}}),
                                           tuple(range(1, MICS + 1)), SR)
            times[label, runtime] = []
        times[label, "prototype"] = []
    hop = next(iter(chains.values())).logmel.hop
    for run in range(args.runs + 1):  # run 0 warms up all (numba, allocators)
        for (label, name), runs in times.items():
            began = time.perf_counter()
            if name == "prototype":
                prototype_loop(audio, clips, models[label][0], work / "proto" / label / str(run), hop)
            else:
                chains[label, name](segment)
            if run:
                runs.append(time.perf_counter() - began)
            print(f"run {run} {label} {name}: {time.perf_counter() - began:.2f} s", file=sys.stderr)
    from signalcraft import vdevice

    record_config = (f"capture:\n  device: {vdevice.DEVICE_NAME}\n  channels: {list(range(1, MICS + 1))}\n"
                     f"noise:\n  dir: {work / 'record-noise'}\n  seconds: 5\n"
                     f"separation:\n  repo: {work / 'models' / 'default'}\n  model: bench\n"
                     "compute:\n  runtime: RUNTIME\noutput:\n  dir: OUT\nlog:\n  file: null\n")
    rss = {runtime: record_peak_rss_mb(work, record_config, audio, runtime) for runtime in ("torch", "onnxruntime")}
    median = {key: statistics.median(runs) for key, runs in times.items()}
    rows, verdicts = [], []
    for label, (model, what) in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        proto = median[label, "prototype"]
        for name in ("torch", "onnxruntime", "prototype"):
            t = median[label, name]
            version = "prototype sequential loop" if name == "prototype" else f"signalcraft `Chain`, {name}"
            ratio = "" if name == "prototype" else f"{proto / t:.2f}x"
            rows.append(f"| {what} ({model.channels} channels, {params:.2f} M parameters) | {version} | "
                        f"{t:.2f} s | {t / SECONDS:.3f} | {ratio} | {', '.join(f'{x:.2f}' for x in times[label, name])} |")
        best = min(median[label, "torch"], median[label, "onnxruntime"])
        verdicts.append(f"{label} model: {best / SECONDS:.3f} x real time, {proto / best:.2f}x the loop: "
                        + ("met" if best <= 0.1 * SECONDS and proto / best >= 3 else "NOT met"))
    difference = max(e["max_difference_of_rms"]["fp32"] for e in exports.values())
    body = f"""## Preprocessing chain speed (scripts/bench_pipeline.py)

One segment of {MICS} channels x {SECONDS:g} s at {SR} Hz through spectral gating, a
4-source Demucs v2 model (depth 4) and 1x240x240 log-mels, tensors written to disk, for
two models: the default one and the default architecture at 32 channels (the earlier
bundled width, four times the computation). The chain separates as configured by default
(`separation.segment: {SeparationConfig().segment}`: each microphone's segment in one
pass); the prototype in demucs' chunks of the model's {float(bundled.segment):g} s with
overlap 0.25. Audio: {source}.
Median of {args.runs} runs after a warm-up, all interleaved; torch threads:
{torch.get_num_threads()}; ONNX Runtime: its own pool. The separators' exports differ from
torch by at most {difference:.2g} of their output's RMS.

| model | version | median per segment | real-time factor | loop / this | runs (s) |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Resident memory (peak RSS) of `signalcraft record --repeat 2` with these {MICS} channels from a
virtual ALSA device and the default model: torch {rss["torch"]:.0f} MB, onnxruntime
{rss["onnxruntime"]:.0f} MB (torch stays loaded for the gate, the log-mels and the .pt tensors).

Target: at most 0.10 x real time for the 8-channel chain with the default model, and at
least 3x the sequential loop: {"; ".join(verdicts)}.
"""
    print(body)
    print(f"written to {write_section('bench_pipeline', body)}")


if __name__ == "__main__":
    main()
