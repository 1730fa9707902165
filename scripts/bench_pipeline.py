"""Time to process one 8-channel, 10 s, 16 kHz segment: signalcraft's chain against the
prototype's sequential per-channel loop, side by side in one run.

Both use the same 4-source Demucs model (the separator's default architecture:
Demucs v2, 16 channels, depth 4; random weights, which do not change the cost), the
same audio and the same noise clips, and both write their tensors to disk.

- signalcraft: `chain.Chain` as `record` runs it: torch spectral gating per channel,
  one batched `apply_model` over all channels, one torchaudio log-mel over all
  (channel, source) pairs, atomic export.
- prototype: for each channel in turn: `noisereduce.reduce_noise` (numpy, stationary,
  the channel's clip), `apply_model` on that channel, a librosa mel per source, save.

Audio: the DCASE 2020 clips in ../shared/data/dcase2020 as eight microphones when
present, else synthetic machine noise.

    python scripts/bench_pipeline.py [--runs 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
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
from signalcraft.separate import save_model

SR = 16000  # Hz
MICS = 8
SECONDS = 10.0
SOURCES = ["pump", "fan", "motor", "valve"]
DCASE = ROOT.parent / "shared" / "data" / "dcase2020"


def separator_model():
    """The separator's default architecture with random weights."""
    from demucs.demucs import Demucs

    torch.manual_seed(0)
    return Demucs(sources=SOURCES, audio_channels=1, samplerate=SR, channels=16, depth=4, segment=4)


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
    model = separator_model().eval()
    save_model(model, work / "models", "bench")
    for k, clip in enumerate(clips):
        save_clip(NoiseClip(clip, SR, k + 1, "bench", dt.datetime.now(dt.timezone.utc)), work / "noise")
    config = config_from_dict({
        "capture": {"channels": list(range(1, MICS + 1))},
        "noise": {"dir": str(work / "noise")},
        "separation": {"repo": str(work / "models"), "model": "bench"},
        "output": {"dir": str(work / "out")},
    })
    chain = Chain(config, tuple(range(1, MICS + 1)), SR)
    segment = Segment(audio=audio, sample_rate=SR, start_time=dt.datetime.now(dt.timezone.utc), start_frame=0,
                      device="bench", channels=tuple(range(1, MICS + 1)))
    times: dict[str, list[float]] = {"signalcraft": [], "prototype": []}
    for run in range(args.runs + 1):  # run 0 warms up both (numba, allocators)
        for name in times:
            began = time.perf_counter()
            if name == "signalcraft":
                chain(segment)
            else:
                prototype_loop(audio, clips, model, work / "proto" / str(run), chain.logmel.hop)
            if run:
                times[name].append(time.perf_counter() - began)
            print(f"run {run} {name}: {time.perf_counter() - began:.2f} s", file=sys.stderr)

    ours, proto = statistics.median(times["signalcraft"]), statistics.median(times["prototype"])
    met = ours <= 2.0 and ours <= proto
    body = f"""## Preprocessing chain speed (scripts/bench_pipeline.py)

One segment of {MICS} channels x {SECONDS:g} s at {SR} Hz through spectral gating, a
4-source Demucs model (v2, 16 channels, depth 4, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters,
random weights) and 1x240x240 log-mels, tensors written to disk. Audio: {source}.
Median of {args.runs} runs after a warm-up, the two interleaved; torch threads: {torch.get_num_threads()}.

| version | median per segment | real-time factor | runs (s) |
|---|---|---|---|
| signalcraft `Chain` | {ours:.2f} s | {ours / SECONDS:.3f} | {", ".join(f"{t:.2f}" for t in times["signalcraft"])} |
| prototype sequential loop | {proto:.2f} s | {proto / SECONDS:.3f} | {", ".join(f"{t:.2f}" for t in times["prototype"])} |
| **ratio prototype / signalcraft** | **{proto / ours:.2f}x** | | |

Target: at most 2.0 s per 8-channel segment (real-time factor 0.2) and never slower
than the sequential loop: {"met" if met else "NOT met"}.
"""
    print(body)
    print(f"written to {write_section('bench_pipeline', body)}")


if __name__ == "__main__":
    main()
