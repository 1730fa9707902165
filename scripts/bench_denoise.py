"""Noise that comes and goes: spectral gating alone against the reference canceller (NLMS,
RLS) alone and with gating, side by side in one run, and what it does to false alarms.

Rooms: the simulator's plant room (a pump and a fan, 4 microphones) with an intermittent
noise source (a ventilation fan that switches on and off and drifts in level and
spectrum, ``LEVEL_DB`` at 1 m) 4.5 m off the end of the microphone line, and a reference
microphone 0.5 m from it. Every configuration runs the product's chain stages
(``Chain.canceller``, then ``Chain.denoiser``) over the rendering as consecutive 10 s
segments, the state carried from one to the next as `record` does:

- intermittent noise removed, dB: its energy at the microphones over the energy it adds
  to the output, after the first ``CONVERGE_S`` seconds (while the filter converges;
  reported too);
- machine energy kept: the energy the machines add to the output over their energy at
  the microphones.

The canceller is linear for given filters, so the intermittent noise and the machines go
through it as shadows of the input (``Canceller.with_shadows``): what becomes of each is
exact. The gate is linear too for the gain it decides on the whole input: each part
passes through that gain (``Denoiser.with_shadows``). The noise clip for gating is the
same room alone (the same installation, another recording), with the machines and the
intermittent source off, as `calibrate-noise` is told to record it.

Real machine sound: the ten real DCASE 2020 normal clips of one machine
(../shared/data/dcase2020, factory noise included) as the machine microphones (two clips
per segment as two microphones), with the simulated intermittent source added at a
noise-to-machine ratio of 0 dB while on, and its reference (the machine leaking into it
at -20 dB). No machines-off recording exists for these clips, so there is no noise clip
to gate against: the canceller alone is measured there. The acoustics of the
intermittent source are simulated; the machine sound and its factory background are
real.

Speed: the canceller's time per 10 s segment over microphones, on this machine.

Downstream: `process` + `detect` as a user runs them on a pump room (one installation,
2 microphones, a reference microphone): calibrated on normal segments with the
intermittent source off, then normal segments with it switching on and off; the share
of (segment, microphone) rows flagged WARNING or CRITICAL, with and without the
canceller.

    python scripts/bench_denoise.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from benchlib import ROOT, write_section
from signalcraft import simulate
from signalcraft.chain import Chain
from signalcraft.config import DenoiseConfig, ReferenceConfig, config_from_dict
from signalcraft.noise import NoiseClip, save_clips

SR = 16000
SEGMENT_S = 10.0
# The intermittent source's level at 1 m over a healthy machine's, dB: at 4.5-7.5 m from
# the microphones it is then about as loud there as the machines (a real nuisance).
LEVEL_DB = 15.0
# Downstream, one pump and 2 microphones: a source this loud, with the reference 1 m from
# it, is about as loud as the pump at the microphones and never makes the simulator turn
# a recording down (which would change the pump's level between recordings).
DOWNSTREAM_LEVEL_DB = 9.0
# The filter converges over about a minute of the source switching on and off: what it
# removes is reported after that (and in it, in brackets).
CONVERGE_S = 60.0
SKIPPED: list[int] = []  # seeds of rooms left out: the simulator turned their twins down unequally
DCASE = ROOT.parent / "shared" / "data" / "dcase2020"
CONFIGS = {  # name -> (reference canceller method or None, gating on)
    "gating alone": (None, True),
    "NLMS alone": ("nlms", False),
    "RLS alone": ("rls", False),
    "NLMS + gating": ("nlms", True),
    "RLS + gating": ("rls", True),
}


def settings(method, gating: bool, noise_dir: Path, mics: int) -> dict:
    return {
        "capture": {"channels": list(range(1, mics + 1)),
                    "reference_channels": [mics + 1] if method else [], "sample_rate": SR,
                    "segment_seconds": SEGMENT_S},
        "noise": {"dir": str(noise_dir)},
        "denoise": {"enabled": gating},
        "reference": {"method": method or "nlms"},
    }


def measure(chain: Chain, audio, reference, v, v_ref, m, m_ref) -> dict:
    """Noise removed (after the first CONVERGE_S, and in them) and machine energy kept by the
    chain's stages before separation, run over consecutive segments (state carried).

    Each stage is linear in its input for the filters or the gain it has settled on: the
    intermittent noise (v at the microphones, v_ref at the reference) and the machines
    (m, m_ref) go through the canceller with its filters as they stand
    (``Canceller.with_shadows``) and through the gate with the gain it decided on the
    whole input (``Denoiser.with_shadows``), so what becomes of each part is exact.
    """
    n = round(SEGMENT_S * SR)
    chain.reset()
    noise_left, machines_left = [], []
    for k in range(0, audio.shape[1] - n + 1, n):
        s = slice(k, k + n)
        if chain.canceller is not None:
            out, out_v, out_m = chain.canceller.with_shadows(audio[:, s], reference[:, s],
                                                             [(v[:, s], v_ref[:, s]), (m[:, s], m_ref[:, s])])
        else:
            out, out_v, out_m = audio[:, s], v[:, s], m[:, s]
        if chain.denoiser is not None:
            out, out_v, out_m = chain.denoiser.with_shadows(out, [out_v, out_m])
        noise_left.append(out_v)
        machines_left.append(out_m)
    noise_left, machines_left = np.concatenate(noise_left, axis=1), np.concatenate(machines_left, axis=1)
    length = noise_left.shape[1]
    settle = min(round(CONVERGE_S * SR), length - n)
    later, first = slice(settle, length), slice(0, settle)

    def removed(part):
        if not np.any(v[:, part]):
            return float("nan")  # no intermittent noise there
        return 10 * np.log10(np.sum(v[:, part] ** 2) / np.sum(noise_left[:, part] ** 2))

    kept = np.sum(machines_left[:, later] ** 2) / np.sum(m[:, later] ** 2)
    return {"removed_db": removed(later), "removed_first_db": removed(first), "kept": kept}


def ideal_mask_kept(audio: np.ndarray, m: np.ndarray, n_fft: int) -> float:
    """What a gate that knew the truth would keep of the machines (``m`` in ``audio``)
    after the first CONVERGE_S: it passes exactly the bins of the gate's STFT where the
    machines are louder than everything else (the ideal binary mask). A reference, not a
    method: a gate keeps more only by passing bins where the rest is the louder."""
    import torch

    settle = min(round(CONVERGE_S * SR), audio.shape[1] - round(SEGMENT_S * SR))
    window = torch.hann_window(n_fft, dtype=torch.float64)

    def stft(x):
        return torch.stft(torch.from_numpy(np.ascontiguousarray(x[:, settle:], dtype=np.float64)), n_fft,
                          n_fft // 4, window=window, return_complex=True)

    machines, rest = stft(m), stft(audio - m)
    passed = torch.istft(machines * (machines.abs() > rest.abs()), n_fft, n_fft // 4, window=window,
                         length=audio.shape[1] - settle).numpy()
    return float(np.sum(passed ** 2) / np.sum(m[:, settle:] ** 2))


def simulated_rooms(seeds, seconds: float, noise_dir: Path):
    """Yield (label, twins, intermittent at mics, machines at mics) per room."""
    for seed, rt60 in seeds:
        base = simulate.default_scene(intermittent=True, references=1, seconds=seconds, seed=seed, snr_db=None,
                                      reverb_rt60_s=rt60)
        full = dataclasses.replace(base, intermittent=dataclasses.replace(base.intermittent, level_db=LEVEL_DB))
        scenes = {"A": full, "C": dataclasses.replace(full, machines=())}
        renders = {k: simulate.render(s) for k, s in scenes.items()}
        if abs(renders["A"].labels["level_gain_db"] - renders["C"].labels["level_gain_db"]) > 0.05:
            print(f"seed {seed}: the limiter turned the twins down unequally; skipped", file=sys.stderr)
            SKIPPED.append(seed)
            continue
        room = simulate.render(dataclasses.replace(full, machines=(), intermittent=None, seconds=SEGMENT_S,
                                                   seed=seed + 10_000, unit=seed))  # the same room, later
        gain = 10 ** (renders["A"].labels["level_gain_db"] / 20)  # the room as loud as in the scene
        clips = [NoiseClip(row * gain, SR, ch + 1, "simulated room", dt.datetime.now(dt.timezone.utc))
                 for ch, row in enumerate(room.mixture)]
        folder = noise_dir / f"seed{seed}"
        save_clips(clips, folder)
        a, c = renders["A"], renders["C"]
        parts = {"audio": a.mixture, "reference": a.reference, "v": a.intermittent, "v_ref": a.reference_intermittent,
                 "m": sum(a.stems.values()), "m_ref": a.reference - c.reference}  # C: the same room without machines
        yield (f"simulated, seed {seed}, {'RT60 ' + format(rt60, 'g') + ' s' if rt60 else 'free field'}", parts,
               folder, True)


def real_room(seconds: float, noise_dir: Path):
    """The real machine clips as two microphones with the simulated intermittent source."""
    files = sorted(DCASE.glob("machineA_normal_*.wav"))
    if len(files) < 2:
        return None
    clips = [sf.read(f, dtype="float32")[0] for f in files]
    n = round(SEGMENT_S * SR)
    count = max(1, int(seconds // SEGMENT_S))
    mics = np.stack([np.concatenate([clips[(k + j) % len(clips)][:n] for k in range(count)]) for j in (0, 5)])
    noise_scene = simulate.default_scene(machines=("pump",), n_mics=2, intermittent=True, references=1,
                                         seconds=mics.shape[1] / SR, seed=7, snr_db=None)
    noise_scene = dataclasses.replace(noise_scene, machines=())
    r = simulate.render(noise_scene)
    on = np.abs(r.intermittent[0]) > 0
    gain = np.sqrt(np.mean(mics[0][on] ** 2) / np.mean(r.intermittent[0][on] ** 2))  # 0 dB while on
    v = r.intermittent * gain
    leak = 0.1 * mics[:1]  # the machine at the reference, -20 dB
    parts = {"audio": mics + v, "reference": r.reference * gain + leak, "v": v,
             "v_ref": r.reference_intermittent * gain, "m": mics, "m_ref": leak}
    return "real machine clips (DCASE machineA) + simulated intermittent source", parts, noise_dir, False


def canceller_cost(method: str, mics: int, repeats: int) -> float:
    """Seconds per second of audio per microphone, median of ``repeats`` segments."""
    from signalcraft.dsp.canceller import Canceller

    rng = np.random.default_rng(0)
    n = round(SEGMENT_S * SR)
    audio = (rng.standard_normal((mics, n)) * 0.01).astype(np.float32)
    reference = (rng.standard_normal((1, n)) * 0.01).astype(np.float32)
    c = Canceller(ReferenceConfig(method=method, adapt_above_db=None), mics, 1)  # learning all the time: the most
    c(audio, reference)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        c(audio, reference)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / SEGMENT_S / mics


def false_alarms(tmp: Path, calibration: int, test: int, canceller: bool) -> dict:
    """`process` then `detect` as a user runs them; returns the flagged share."""
    from click.testing import CliRunner

    from signalcraft.cli import cli

    project = tmp / ("with" if canceller else "without")
    project.mkdir()
    config = {
        "capture": {"channels": [1, 2], "reference_channels": [3] if canceller else [], "sample_rate": SR},
        "denoise": {"enabled": False},
        "output": {"dir": "out", "keep_days": None},
        "detect": {"calibration_segments": calibration, "model": "detector.pt"},
        "log": {"file": None},
    }
    (project / "config.yaml").write_text(yaml.safe_dump(config))
    recordings = project / "recordings"
    recordings.mkdir()
    start = dt.datetime(2026, 1, 5, 8, tzinfo=dt.timezone.utc).timestamp()  # the recordings' clock
    files = []
    for k in range(calibration + test):
        intermittent = k >= calibration  # off while calibrating, then switching on and off
        scene = simulate.default_scene(machines=("pump",), n_mics=2, intermittent=True, references=1,
                                       seconds=SEGMENT_S, seed=500 + k, unit=3, snr_db=None)
        loud = dataclasses.replace(scene.intermittent, level_db=DOWNSTREAM_LEVEL_DB)
        x, y, z = loud.position
        scene = dataclasses.replace(scene, intermittent=loud if intermittent else None,  # the same geometry
                                    references=((x - 1.0, y, z),))  # 1 m from the source: nothing turned down
        r = simulate.render(scene)
        if r.labels["level_gain_db"] != 0:  # the limiter would change the machine's level between recordings
            raise RuntimeError(f"recording {k}: the simulator turned the scene down; lower DOWNSTREAM_LEVEL_DB")
        frames = np.concatenate([r.mixture, r.reference]).T if canceller else r.mixture.T
        path = recordings / f"room-{k:03d}.wav"
        sf.write(path, frames, SR, subtype="FLOAT")
        t = start + SEGMENT_S * (k + 1)
        os.utime(path, (t, t))
        files.append(path)
    runner = CliRunner()
    args = ["--config", str(project / "config.yaml")]
    t0 = time.perf_counter()
    done = runner.invoke(cli, [*args, "process", *map(str, files[:calibration])], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    runner.invoke(cli, [*args, "detect", str(project / "out")], catch_exceptions=False)
    done = runner.invoke(cli, [*args, "process", *map(str, files[calibration:])], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    result = runner.invoke(cli, [*args, "detect", str(project / "out"), "--json"], catch_exceptions=False)
    rows = [r for r in json.loads(result.stdout)["rows"] if r["status"] != "CALIBRATING"]
    flagged = sum(r["status"] in ("WARNING", "CRITICAL") for r in rows)
    return {"rows": len(rows), "flagged": flagged, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter rooms, one seed, fewer detect segments")
    options = parser.parse_args()
    seconds = 30.0 if options.quick else 120.0
    seeds = [(1, None)] if options.quick else [(1, None), (2, 0.6), (3, 1.0), (4, 1.0), (5, 0.8)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = []
        sources = list(simulated_rooms(seeds, seconds, tmp / "noise"))
        real = real_room(seconds, tmp / "noise")
        if real is None:
            print(f"{DCASE}: no DCASE clips; the real-machine row is left out", file=sys.stderr)
        else:
            sources.append(real)
        for label, parts, clip_dir, has_clip in sources:
            mics = parts["audio"].shape[0]
            t = time.perf_counter()
            rows = {}
            for name, (method, gating) in CONFIGS.items():
                if gating and not has_clip:
                    continue  # no machines-off recording to gate against
                chain = Chain(config_from_dict(settings(method, gating, clip_dir, mics)), tuple(range(1, mics + 1)),
                              SR, (mics + 1,) if method else ())
                rows[name] = measure(chain, **parts)
                if name == "gating alone":  # what the gate costs the machines when the source is off
                    quiet = {**parts, "audio": parts["audio"] - parts["v"],
                             "reference": parts["reference"] - parts["v_ref"],
                             "v": np.zeros_like(parts["v"]), "v_ref": np.zeros_like(parts["v_ref"])}
                    rows["source off: gating"] = measure(chain, **quiet)
                    per_frame = config_from_dict({**settings(method, gating, clip_dir, mics),
                                                  "denoise": {"decision_ms": None, "n_std_thresh": 1.5}})
                    rows["source off: per-frame gating"] = measure(
                        Chain(per_frame, tuple(range(1, mics + 1)), SR, ()), **quiet)
                    rows["source off: ideal mask"] = {"kept": ideal_mask_kept(quiet["audio"], parts["m"],
                                                                              chain.config.denoise.n_fft)}
            print(f"{label}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
            results.append((label, rows))
        cost = {method: canceller_cost(method, 4, 3 if options.quick else 7) for method in ("nlms", "rls")}
        calibration, test = (10, 10) if options.quick else (30, 30)
        downstream = {flag: false_alarms(tmp, calibration, test, flag) for flag in (False, True)}

    d, g = ReferenceConfig(), DenoiseConfig()
    lines = [
        "## Intermittent noise and the reference canceller (scripts/bench_denoise.py)",
        "",
        "Rooms with a noise source that switches on and off and drifts in level and spectrum, a reference "
        f"microphone 0.5 m from it, 4.5 m off the end of the microphone line, {LEVEL_DB:+g} dB over a machine at 1 m "
        "(about as loud as the machines at the microphones). Each configuration is the product's "
        f"chain stages (canceller, then gate) over {seconds:g} s as consecutive 10 s segments. *Removed*: "
        "the intermittent noise's energy at the microphones over what it adds to the output, once converged: "
        f"after the first {CONVERGE_S:g} s (in them, while the filter converges, in brackets). *Kept*: the energy "
        "the machines add to the output over their energy at the microphones, after the first "
        f"{CONVERGE_S:g} s. The noise and the machines pass the canceller as "
        "shadows of the input (the same filters, exact), and through the gate with the gain it decided on the whole "
        f"input (exact too). Default settings ({d.taps} taps, nlms blocks of {d.block}, step {d.step_size:g}; rls "
        f"forgetting {d.forgetting:g}; learning while the reference is {d.adapt_above_db:g} dB above its quiet "
        f"level; gating: n_std_thresh {g.n_std_thresh:g}, decision over {g.decision_ms:g} ms).",
        "",
        "| room | " + " | ".join(CONFIGS) + " | NLMS + gating vs gating alone | gating, source off | per-frame "
        "gating, source off | ideal mask, source off |",
        "|---|" + "---|" * (len(CONFIGS) + 4),
    ]
    for label, rows in results:
        cells = [f"{rows[name]['removed_db']:.1f} dB ({rows[name]['removed_first_db']:.1f}), kept "
                 f"{100 * rows[name]['kept']:.0f}%" if name in rows else "n/a (no noise clip)" for name in CONFIGS]
        verdict = "n/a"
        if "gating alone" in rows:
            gain = rows["NLMS + gating"]["removed_db"] - rows["gating alone"]["removed_db"]
            met = gain >= 10 and rows["NLMS + gating"]["kept"] >= 0.9
            verdict = (f"{gain:+.1f} dB, kept {100 * rows['NLMS + gating']['kept']:.0f}% "
                       f"({'met' if met else 'missed'})")
        off = [f"kept {100 * rows[key]['kept']:.0f}%" if key in rows else "n/a"
               for key in ("source off: gating", "source off: per-frame gating", "source off: ideal mask")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {verdict} | " + " | ".join(off) + " |")
    lines += [
        "",
        "Target: NLMS + gating removes at least 10 dB more of the intermittent noise than gating alone and keeps at "
        "least 90% of the machines' energy. "
        + (f"Rooms of seeds {', '.join(map(str, SKIPPED))} are left out: the simulator's peak limiter turned "
           "the room and its twin without machines down by different amounts, so the machines' share could not be "
           "separated exactly. " if SKIPPED else "")
        + "*Gating, source off*: what the gate keeps of the machines in the same "
        "room with the intermittent source off, the gate's own cost (a loud noise holds the gate open, so gating "
        "alone keeps more of the machines while the source is on). *Per-frame gating*: the same, deciding on each "
        "STFT frame alone as noisereduce does (`denoise.decision_ms: null`, `n_std_thresh: 1.5`, the settings "
        "before the averaged decision). *Ideal mask, source off*: what a gate that knew "
        "the truth would keep there, passing exactly the bins (of the gate's STFT) where the machines are louder than "
        "the room (the ideal binary mask). A gate keeps more than that only by also passing bins where the room is "
        "the louder. The real-machine row has no noise clip to gate "
        "against (no machines-off recording exists for those clips): the canceller alone.",
        "",
        "Canceller cost while learning, 4 microphones, 1 reference, 10 s segments, median: NLMS "
        f"{cost['nlms']:.4f} x real time per microphone (target at most 0.02), RLS {cost['rls']:.4f} "
        f"({cost['rls'] / cost['nlms']:.2f}x NLMS).",
        "",
        f"Downstream, `process` + `detect` (one pump, 2 microphones, denoise off, {calibration} calibration "
        f"segments with the intermittent source off, then {test} normal segments with it switching on and off, "
        f"{DOWNSTREAM_LEVEL_DB:+g} dB at 1 m, the reference 1 m from it):",
        "",
        "| | (segment, mic) rows | flagged WARNING or CRITICAL | share | time |",
        "|---|---|---|---|---|",
    ]
    for flag, d in downstream.items():
        lines.append(f"| {'with' if flag else 'without'} the canceller | {d['rows']} | {d['flagged']} | "
                     f"{100 * d['flagged'] / max(d['rows'], 1):.0f}% | {d['seconds']:.0f} s |")
    body = "\n".join(lines)
    print(body)
    write_section("denoise", body)


if __name__ == "__main__":
    main()
