"""Separation quality: SI-SDR improvement on held-out mixtures, simulated and real.

Three parts, each comparing on the same mixtures (machines at equal level, 0 dB between
sources):

1. Simulated, per microphone: microphone 0 of scenes rendered by `simulate` (seeds from
   TEST_SEED, never used in training), 2 and 4 sources, without and with the factory
   background at 0 dB against the machines. The per-microphone model (by default the
   bundled `plant`, built by scripts/build_demo_separator.sh), and beside it a hybrid
   model (HDemucs, 4096-point spectrogram branch) trained in this run on the same data
   with the same recipe for at most --hybrid-minutes.
   Then the same on the machines of one installation: a model trained in this run on
   `simulate --training-set --unit INSTALLATION` (each machine of that installation
   recorded alone, as a user records their own machines to train a separator for them),
   starting from the per-microphone model's weights (train_separator.init), tested on
   other recordings of the same machines (same unit, seeds from TEST_SEED).
2. Simulated, array: the demo's room (pump, fan and motor where they stand, 4
   microphones, a new installation and recording per mixture), with 2 of the machines
   running (the motor off) or all 3. The array model (the bundled `plant_array`, trained
   on each machine recorded alone where it stands), with its spatial filter as `record`
   runs it (the room's covariance from a noise clip of the same installation, its power
   capped at the clip's, separation.room_headroom 1, but for the room's
   transients), the same with the room uncapped (room_headroom null), and its network
   alone, beside the per-microphone model run on each channel. SI-SDR is over every
   source at every microphone.
3. Real recordings, one microphone: the DCASE 2020 slide rail (id 00, normal clips) and
   machine A of ../shared/data/dcase2020, isolated clips. A per-microphone model is
   trained here, with the product's train-separator and the recipe of
   scripts/plant_separator.yaml, on disjoint clips (rail 0-79, machine A 0-7) for at
   most --real-minutes, and the hybrid recipe's model beside it; the mixtures are the
   other clips (rail 80-99 with machine A 8-9) at 0 dB. The recordings carry their own factory noise, which stays in each
   source's reference.

Beside each model: an NMF baseline (per-source dictionaries learnt with
librosa.decompose on the same training recordings, and one for the background where
there is one; activations fitted to the mixture with the dictionaries fixed, soft
masks), an oracle (the ideal ratio mask from the true sources per microphone, or in
the array the multichannel Wiener filter from the true sources' spatial covariances:
what a filter of that kind could reach at best, not a method; per microphone also the
time-invariant filter from each true source's long-term spectrum) and no separation (the
mixture as every source's estimate, SI-SDRi 0 by definition).

SI-SDRi = SI-SDR(estimate, source) - SI-SDR(mixture, source), averaged over sources,
microphones and mixtures. Also reports training time and separation time per 10 s.

    python scripts/bench_separation.py [--repo models/separator] [--real-minutes 30] [--hybrid-minutes 30]
                                       [--installation-minutes 30]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import yaml

from benchlib import ROOT, write_section
from signalcraft import simulate
from signalcraft.config import SeparationConfig, config_from_dict
from signalcraft.separate import load_separator, model_file, read_model
from signalcraft.training.separator import NOISE_DIR, si_sdr, train_separator

SR = 16000  # Hz
SECONDS = 10.0
N_FFT = 1024  # NMF and oracle STFT size, samples
HOP = 256
LONG_FFT = 16384  # the time-invariant oracle's STFT size, samples
COMPONENTS = 16  # NMF dictionary atoms per source
TEST_SEED = 10_000  # test scenes use seeds from here; training sets use small seeds
INSTALLATION = 20_000  # the unit whose own machines the installation model is trained on and tested on
ROOM = ("pump", "fan", "motor")  # the demo's room, where the array model was trained
MICS = 4
SHARED = ROOT.parent / "shared" / "data"
RAIL = SHARED / "dcase2020_slider" / "id_00" / "normal"
MACHINE_A = SHARED / "dcase2020"
RECIPE = ROOT / "scripts" / "plant_separator.yaml"
# The hybrid per-microphone model trained in the run: plant_separator.yaml's recipe with
# HDemucs, whose spectrogram branch at 4096 points resolves tones 4 Hz apart.
HYBRID = {"architecture": "hdemucs", "nfft": 4096, "depth": 5}


# --- References ---------------------------------------------------------------------------
def stft(x: np.ndarray) -> np.ndarray:
    import librosa

    return librosa.stft(x, n_fft=N_FFT, hop_length=HOP)


def istft(X: np.ndarray, length: int) -> np.ndarray:
    import librosa

    return librosa.istft(X, hop_length=HOP, length=length)


def nmf_dictionaries(recordings: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Per source (and background): (freq, COMPONENTS) non-negative dictionary learnt
    from up to 10 of its mono recordings."""
    import librosa

    out = {}
    for name, clips in recordings.items():
        S = np.abs(stft(np.concatenate(clips[:10])))
        out[name], _ = librosa.decompose.decompose(S, n_components=COMPONENTS, sort=False, max_iter=400,
                                                   random_state=0)
    return out


def nmf_separate(mix: np.ndarray, dictionaries: dict[str, np.ndarray], sources: list[str]) -> np.ndarray:
    """(samples,) -> (len(sources), samples) with the dictionaries held fixed."""
    from sklearn.decomposition import non_negative_factorization

    X = stft(mix)
    names = list(dictionaries)
    W = np.concatenate([dictionaries[n] for n in names], axis=1)  # (freq, atoms)
    with warnings.catch_warnings():  # sklearn notes the unused initial W and the iteration cap per call
        warnings.simplefilter("ignore")
        H, _, _ = non_negative_factorization(np.abs(X).T, H=W.T, n_components=W.shape[1], update_H=False,
                                             init="custom", W=np.full((X.shape[1], W.shape[1]), 1e-2), max_iter=400)
    H = H.T  # (atoms, frames)
    parts = {n: dictionaries[n] @ H[k * COMPONENTS:(k + 1) * COMPONENTS] for k, n in enumerate(names)}
    total = sum(parts.values()) + 1e-10
    return np.stack([istft(parts[s] / total * X, mix.size) for s in sources])


def with_rest(mix: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """The sources and, when there is any, what else is in the mixture (the room)."""
    rest = mix - sources.sum(0)
    return np.concatenate([sources, rest[None]]) if np.mean(rest ** 2) > 1e-6 * np.mean(mix ** 2) else sources


def ideal_ratio_mask(mix: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Oracle per microphone, from the true sources (and room): (samples,), (n, samples)
    -> (n, samples)."""
    X = stft(mix)
    power = np.stack([np.abs(stft(s)) ** 2 for s in with_rest(mix, sources)])
    return np.stack([istft(p / (power.sum(0) + 1e-12) * X, mix.size) for p in power[:len(sources)]])


def time_invariant_wiener(mix: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Oracle per microphone: one gain per frequency for the whole mixture, from each true
    source's (and the room's) mean power spectrum at LONG_FFT points (1 Hz bins at 16
    kHz, fine enough to part two machines' shaft harmonics). What a filter that knows each
    machine's spectrum exactly, but not how it varies in time, can do. (samples,),
    (n, samples) -> (n, samples)."""
    import librosa

    spectrum = lambda x: librosa.stft(x, n_fft=LONG_FFT, hop_length=LONG_FFT // 4)  # noqa: E731
    X = spectrum(mix)
    power = np.stack([np.mean(np.abs(spectrum(s)) ** 2, axis=1) for s in with_rest(mix, sources)])
    gains = power / (power.sum(0) + 1e-20)
    return np.stack([librosa.istft(g[:, None] * X, hop_length=LONG_FFT // 4, length=mix.size)
                     for g in gains[:len(sources)]])


def multichannel_wiener(mix: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Oracle for the array: each source's image at every microphone by the
    time-invariant multichannel Wiener filter built from the true images' (and the
    room's) spatial covariance per frequency. (mics, samples), (n, mics, samples) ->
    (n, mics, samples)."""
    n = len(images)
    images = with_rest(mix, images)
    S = np.stack([[stft(c) for c in image] for image in images])  # (n, mics, freq, frames)
    X = stft_all(mix)
    R = np.einsum("jmft,jnft->jfmn", S, S.conj()) / S.shape[-1]
    Rx = R.sum(0) + 1e-9 * np.eye(mix.shape[0])
    W = np.einsum("jfmn,fnk->jfmk", R, np.linalg.inv(Rx))
    E = np.einsum("jfmn,nft->jmft", W, X)
    return np.stack([[istft(E[j, m], mix.shape[-1]) for m in range(mix.shape[0])] for j in range(n)])


def stft_all(x: np.ndarray) -> np.ndarray:
    return np.stack([stft(c) for c in x])


def improvement(estimates: np.ndarray, sources: np.ndarray, mix: np.ndarray) -> tuple[float, float]:
    """Mean SI-SDR and SI-SDRi (dB) over sources (and microphones): ``estimates`` and
    ``sources`` of one shape, (n, samples) or (n, mics, samples); ``mix`` (samples,) or
    (mics, samples)."""
    est, ref = torch.from_numpy(np.asarray(estimates)).double(), torch.from_numpy(np.asarray(sources)).double()
    sdr = si_sdr(est, ref)
    base = si_sdr(torch.from_numpy(np.asarray(mix)).double().expand_as(ref), ref)
    return float(sdr.mean()), float((sdr - base).mean())


# --- Mixtures -----------------------------------------------------------------------------
def equal(stems: np.ndarray) -> np.ndarray:
    """Stems (n, ...) rescaled to equal power over all their samples, at 0.05 RMS."""
    axes = tuple(range(1, stems.ndim))
    return 0.05 * stems / (np.sqrt(np.mean(stems ** 2, axis=axes, keepdims=True)) + 1e-12)


def room_gain(machines: np.ndarray, room: np.ndarray) -> float:
    """The gain that puts ``room`` at 0 dB against the machines' sum."""
    return float(np.sqrt(np.mean(machines ** 2) / (np.mean(room ** 2) + 1e-20)))


def with_room(machines: np.ndarray, room: np.ndarray, background: bool) -> np.ndarray:
    """The machines' sum plus, with ``background``, the room at 0 dB against it."""
    return (machines + room_gain(machines, room) * room * background).astype(np.float32)


def mono_mixture(kinds: tuple[str, ...], seed: int, background: bool,
                 unit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Mic 0 of a rendered scene (of installation ``unit``, else the seed's own): the
    mixture (samples,) and the sources (n, samples)."""
    scene = simulate.default_scene(machines=kinds, n_mics=1, seconds=SECONDS, seed=seed, unit=unit)
    rendering = simulate.render(scene)
    stems = equal(np.stack([rendering.stems[m.name][0] for m in scene.machines]).astype(np.float64))
    return with_room(stems.sum(0), rendering.background[0], background), stems.astype(np.float32)


def array_mixture(kinds: tuple[str, ...], seed: int, background: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """The demo room at every microphone with only ``kinds`` running (the others where
    they always stand, off): (mics, samples), the images (n, mics, samples), and the gain
    that put the room at 0 dB against the machines (also without ``background``: the room
    is then missing from the mixture, not from the noise clip)."""
    scene = simulate.default_scene(machines=ROOM, n_mics=MICS, seconds=SECONDS, seed=seed)
    rendering = simulate.render(scene)
    stems = equal(np.stack([rendering.stems[m.name] for m in scene.machines if m.kind in kinds]).astype(np.float64))
    return (with_room(stems.sum(0), rendering.background, background), stems.astype(np.float32),
            room_gain(stems.sum(0), rendering.background))


def room_clip(seed: int, gain: float) -> np.ndarray:
    """The noise clip of the installation of ``seed``: its room recorded at another time
    with the machines off (another seed of the same unit), at the gain of the mixtures'
    room (one recording chain), (mics, samples)."""
    scene = simulate.default_scene(machines=ROOM, n_mics=MICS, seconds=SECONDS, seed=seed + 1, unit=seed)
    return (gain * simulate.render(scene).background).astype(np.float32)


# --- Runs ---------------------------------------------------------------------------------
def timed(fn: Callable, times: list[float]):
    began = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - began)
    return out


def score_rows(conditions, mixture, methods, n: int) -> tuple[list, dict]:
    """For each (label, kinds, background) condition and each method, mean (SI-SDR,
    SI-SDRi) over ``n`` mixtures; and each method's times."""
    rows, times = [], {name: [] for name in methods}
    for label, kinds, background in conditions:
        scores = {name: [] for name in methods}
        for k in range(n):
            mix, refs = mixture(kinds, background, k)
            for name, method in methods.items():
                est = timed(lambda: method(mix, refs, kinds), times[name])
                scores[name].append(improvement(est, refs, mix))
        rows.append((label, {m: (np.mean([s for s, _ in v]), np.mean([i for _, i in v])) for m, v in scores.items()}))
    return rows, times


def table(rows, methods: list[str], head: str) -> str:
    lines = [f"| {head} | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for label, r in rows:
        lines.append(f"| {label} | " + " | ".join(f"{r[m][1]:.2f} dB ({r[m][0]:.2f})" for m in methods) + " |")
    return "\n".join(lines)


def mono_recordings(data: Path, sources: list[str]) -> dict[str, list[np.ndarray]]:
    """Up to 10 mono recordings (channel 0) per source and of the background."""
    import soundfile as sf

    out = {}
    for name in [*sources, NOISE_DIR]:
        files = sorted(p for p in (data / name).glob("*") if p.suffix in (".wav", ".flac"))[:10]
        if files:
            out[name] = [sf.read(p, dtype="float32", always_2d=True)[0][:, 0] for p in files]
        elif name != NOISE_DIR:
            sys.exit(f"{data / name}: no recordings for the NMF baseline; pass the model's training data "
                     "(scripts/build_demo_separator.sh writes it) with --data / --array-data")
    return out


def model_facts(repo: Path, name: str) -> str:
    """The model's recipe and training from its checkpoint, which must hold the model's
    own weights (a checkpoint left from another training run says nothing of it)."""
    path = model_file(repo, name)
    weights = read_model(path).state_dict()
    if not (repo / "checkpoints" / f"{name}.pt").is_file():
        params = sum(v.numel() for v in weights.values() if v.is_floating_point())
        return (f"`{name}` ({path.name}, {params / 1e6:.2f} M parameters): its checkpoint is not in {repo}, so how "
                "it was trained is not known here")
    ckpt = torch.load(repo / "checkpoints" / f"{name}.pt", weights_only=True)
    if any(k not in ckpt["model"] or ckpt["model"][k].shape != v.shape for k, v in weights.items()):
        return f"`{name}` ({path.name}): its checkpoint is of another model, so how it was trained is not known here"
    c = ckpt["config"]
    params = sum(v.numel() for v in ckpt["model"].values() if v.is_floating_point())
    nfft = "" if c["architecture"] == "demucs" else f", nfft {c.get('nfft', 1024)}"
    start = f", started from `{c['init']}`" if c.get("init") else ""
    return (f"`{name}`: {c['architecture']}, {c['channels']} channels, depth {c['depth']}{nfft}, "
            f"{params / 1e6:.2f} M parameters, {model_file(repo, name).stat().st_size / 1e6:.1f} MB; "
            f"{c.get('loss', 'l1')} loss, {c['segment_seconds']:g} s excerpts, batch {c['batch_size']}, "
            f"learning rate {c['learning_rate']:g}{start}; {ckpt['step']} steps in {ckpt['train_seconds'] / 60:.1f} min "
            f"(validation SI-SDRi {ckpt['best_sdri']:.2f} dB)")


def train_here(data: Path, repo: Path, name: str, minutes: float, **recipe) -> tuple[Callable, str]:
    """A per-microphone model trained in this run with the product's train-separator, on
    ``data``, with scripts/plant_separator.yaml's recipe changed by ``recipe``, for
    ``minutes``: the separator and its facts."""
    settings = yaml.safe_load(RECIPE.read_text())["train_separator"]
    settings.update(name=name, max_minutes=minutes, epochs=10_000, patience=10_000, export_half=False, **recipe)
    config = config_from_dict({"separation": {"repo": str(repo)}, "train_separator": settings})
    train_separator(data, config, progress=False, force=True)
    return load_separator(SeparationConfig(repo=repo, model=name), SR), model_facts(repo, name)


def mono_methods(separators: dict[str, Callable], dictionaries: dict[str, np.ndarray]) -> dict[str, Callable]:
    """The per-microphone methods: each model in ``separators`` (by column name), NMF on
    the first model's sources, the oracles and no separation."""
    def model(separator):
        names = list(separator.sources)
        return lambda mix, refs, kinds: separator(mix[None])[0][[names.index(k) for k in kinds]]

    sources = list(next(iter(separators.values())).sources)
    return {
        **{column: model(separator) for column, separator in separators.items()},
        "NMF": lambda mix, refs, kinds: nmf_separate(mix, dictionaries, sources)[[sources.index(k) for k in kinds]],
        "oracle ratio mask": lambda mix, refs, kinds: ideal_ratio_mask(mix, refs),
        "oracle time-invariant filter": lambda mix, refs, kinds: time_invariant_wiener(mix, refs),
        "no separation": lambda mix, refs, kinds: np.repeat(mix[None], len(kinds), 0),
    }


# The per-microphone conditions: (label, machines running, background at 0 dB or none).
MONO_CONDITIONS = [(f"{len(kinds)} ({', '.join(kinds)}), background {'0 dB' if bg else 'none'}", kinds, bg)
                   for kinds in (("pump", "fan"), ("pump", "fan", "motor", "valve")) for bg in (False, True)]


def simulated_mono(repo: Path, name: str, data: Path, n: int, hybrid_minutes: float,
                   tmp: Path) -> tuple[list[str], list, dict]:
    separators = {"trained model": load_separator(SeparationConfig(repo=repo, model=name), SR)}
    facts = [model_facts(repo, name)]
    if hybrid_minutes:
        separators["hybrid model"], hybrid_facts = train_here(data, tmp / "models", "plant_hybrid", hybrid_minutes,
                                                              **HYBRID)
        facts.append(hybrid_facts)
    dictionaries = nmf_dictionaries(mono_recordings(data, list(separators["trained model"].sources)))
    methods = mono_methods(separators, dictionaries)
    rows, times = score_rows(MONO_CONDITIONS,
                             lambda kinds, bg, k: mono_mixture(kinds, TEST_SEED + 100 * len(kinds) + k, bg),
                             methods, n)
    return facts, rows, times


def installation_mono(repo: Path, name: str, n: int, minutes: float, tmp: Path) -> tuple[list[str], list, dict]:
    """A per-microphone model trained in this run on the machines of installation
    INSTALLATION, each recorded alone (24 clips per machine, as build_demo_separator.sh
    writes), starting from model ``name``'s weights, beside that model, scored on other
    recordings of the same machines."""
    data = simulate.write_training_set(tmp / "installation", clips_per_source=24, seed=0, unit=INSTALLATION)
    start = model_file(repo, name)
    (tmp / "models").mkdir(exist_ok=True)
    shutil.copy2(start, tmp / "models" / start.name)
    installation, facts = train_here(data, tmp / "models", "installation", minutes, init=name)
    separators = {"installation model": installation,
                  "trained model": load_separator(SeparationConfig(repo=repo, model=name), SR)}
    dictionaries = nmf_dictionaries(mono_recordings(data, list(separators["installation model"].sources)))
    rows, times = score_rows(
        MONO_CONDITIONS, lambda kinds, bg, k: mono_mixture(kinds, TEST_SEED + 100 * len(kinds) + k, bg, INSTALLATION),
        mono_methods(separators, dictionaries), n)
    return [facts], rows, times


def simulated_array(repo: Path, name: str, mono: str, data: Path, n: int) -> tuple[str, list, dict]:
    array = load_separator(SeparationConfig(repo=repo, model=name), SR)
    if not array.spatial:
        sys.exit(f"{model_file(repo, name)}: the array model carries no spatial covariances; rebuild it with "
                 "scripts/build_demo_separator.sh array")
    uncapped = load_separator(SeparationConfig(repo=repo, model=name, room_headroom=None), SR)
    network = load_separator(SeparationConfig(repo=repo, model=name, spatial_iterations=0), SR)
    per_mic = load_separator(SeparationConfig(repo=repo, model=mono), SR)
    a_src, m_src = list(array.sources), list(per_mic.sources)
    dictionaries = nmf_dictionaries(mono_recordings(data, a_src))

    def by_mic(fn):  # a per-microphone method on every channel: (n, mics, samples)
        return lambda mix, refs, kinds: np.stack([fn(mix[m], refs[:, m], kinds) for m in range(mix.shape[0])], 1)

    def placed(mixture, seed):  # as `record` does: the spatial filter knows the room from its noise clip
        mix, images, gain = mixture
        clip = room_clip(seed, gain)
        array.set_room(clip)
        uncapped.set_room(clip)
        return mix, images

    methods = {
        "array model": lambda mix, refs, kinds: array(mix)[:, [a_src.index(k) for k in kinds]].transpose(1, 0, 2),
        "array model, room uncapped": lambda mix, refs, kinds:
            uncapped(mix)[:, [a_src.index(k) for k in kinds]].transpose(1, 0, 2),
        "array network alone": lambda mix, refs, kinds:
            network(mix)[:, [a_src.index(k) for k in kinds]].transpose(1, 0, 2),
        "per-microphone model": by_mic(lambda x, r, kinds: per_mic(x[None])[0][[m_src.index(k) for k in kinds]]),
        "NMF": by_mic(lambda x, r, kinds: nmf_separate(x, dictionaries, a_src)[[a_src.index(k) for k in kinds]]),
        "oracle multichannel Wiener": lambda mix, refs, kinds: multichannel_wiener(mix, refs),
        "no separation": lambda mix, refs, kinds: np.repeat(mix[None], len(kinds), 0),
    }
    conditions = [(f"{len(kinds)} ({', '.join(kinds)}), background {'0 dB' if bg else 'none'}", kinds, bg)
                  for kinds in (("pump", "fan"), ROOM) for bg in (False, True)]
    seed = lambda kinds, k: TEST_SEED + 500 + 100 * len(kinds) + k  # noqa: E731
    rows, times = score_rows(conditions,
                             lambda kinds, bg, k: placed(array_mixture(kinds, seed(kinds, k), bg), seed(kinds, k)),
                             methods, n)
    return model_facts(repo, name), rows, times


def real_mono(minutes: float, n: int, hybrid: bool) -> tuple[list[str], list, dict]:
    """Train on isolated real clips, score held-out real mixtures at 0 dB."""
    import soundfile as sf

    rail = sorted(RAIL.glob("*.flac"))
    machine_a = sorted(MACHINE_A.glob("machineA_normal_*.wav"))
    if len(rail) < 100 or len(machine_a) < 10:
        sys.exit(f"real recordings missing: need {RAIL} (100 clips) and {MACHINE_A} (10 machineA clips)")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        for name, files in (("rail", rail[:80]), ("machineA", machine_a[:8])):
            (data / name).mkdir(parents=True)
            for f in files:
                (data / name / f.name).symlink_to(f)
        repo = Path(tmp) / "models"
        separators, facts = {}, []
        separators["trained model"], real_facts = train_here(data, repo, "real", minutes)
        facts.append(real_facts)
        if hybrid:
            separators["hybrid model"], hybrid_facts = train_here(data, repo, "real_hybrid", minutes, **HYBRID)
            facts.append(hybrid_facts)
        dictionaries = nmf_dictionaries(mono_recordings(data, list(separators["trained model"].sources)))
        tests = {"rail": [sf.read(f, dtype="float32")[0] for f in rail[80:]],
                 "machineA": [sf.read(f, dtype="float32")[0] for f in machine_a[8:]]}

        def mixture(kinds, bg, k):
            stems = equal(np.stack([tests[s][k % len(tests[s])] for s in kinds]).astype(np.float64))
            return stems.sum(0).astype(np.float32), stems.astype(np.float32)

        rows, times = score_rows([("2 (slide rail id 00, machine A)", ("rail", "machineA"), False)], mixture,
                                 mono_methods(separators, dictionaries), n)
    return facts, rows, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=ROOT / "models" / "separator", help="model folder")
    parser.add_argument("--mono", default="plant", help="per-microphone model in --repo")
    parser.add_argument("--array", default="plant_array", help="array model in --repo, trained on the demo room")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "separator-training",
                        help="the per-microphone model's training data (for the NMF dictionaries)")
    parser.add_argument("--array-data", type=Path, default=ROOT / "data" / "separator-training-array",
                        help="the array model's training data (for the NMF dictionaries)")
    parser.add_argument("--mixtures", type=int, default=12, help="held-out mixtures per condition")
    parser.add_argument("--real-minutes", type=float, default=30.0, help="training budget of the real-data models")
    parser.add_argument("--hybrid-minutes", type=float, default=30.0,
                        help="training budget of the hybrid per-microphone model trained in the run on --data "
                             "(0: none, and no hybrid model on the real recordings either)")
    parser.add_argument("--installation-minutes", type=float, default=30.0,
                        help="training budget of the per-microphone model trained in the run on one installation's "
                             "machines")
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        mono_facts, mono_rows, mono_times = simulated_mono(args.repo, args.mono, args.data, args.mixtures,
                                                           args.hybrid_minutes, Path(tmp))
    print(table(mono_rows, list(mono_rows[0][1]), "per microphone"), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        own_facts, own_rows, own_times = installation_mono(args.repo, args.mono, args.mixtures,
                                                           args.installation_minutes, Path(tmp))
    print(table(own_rows, list(own_rows[0][1]), "per microphone, one installation"), flush=True)
    array_facts, array_rows, array_times = simulated_array(args.repo, args.array, args.mono, args.array_data,
                                                           args.mixtures)
    print(table(array_rows, list(array_rows[0][1]), "array"), flush=True)
    real_facts, real_rows, real_times = real_mono(args.real_minutes, 2 * args.mixtures, bool(args.hybrid_minutes))
    print(table(real_rows, list(real_rows[0][1]), "real"), flush=True)

    def verdict(rows, model: str, target: float, selector=lambda label: True) -> str:
        chosen = [(label, r) for label, r in rows if selector(label)]
        fails = [f"{label}: {r[model][1]:.2f} dB" for label, r in chosen if r[model][1] < target]
        below_nmf = [label for label, r in chosen if r[model][1] <= r["NMF"][1]]
        if not fails and not below_nmf:
            return "met"
        return "NOT met (" + "; ".join(fails + [f"not above NMF: {b}" for b in below_nmf]) + ")"

    two = lambda label: label.startswith("2 ")  # noqa: E731
    ms = lambda times: statistics.median(times) * 1000  # noqa: E731
    hybrid = bool(args.hybrid_minutes)

    def models(facts: list[str], times: dict, columns=("trained model", "hybrid model")) -> str:
        """The models' facts and their time per 10 s."""
        return "\n".join(f"- {column}: {fact}; {ms(times[column]):.0f} ms per 10 s."
                          for column, fact in zip(columns, facts))

    hybrid_note = f"""
"hybrid model" is trained in this run, {args.hybrid_minutes:g} minutes on 2 cores, with the same recipe
(scripts/plant_separator.yaml) and data but HDemucs with a 4096-point spectrogram branch
(train_separator.architecture hdemucs, nfft 4096, depth 5)."""if hybrid else ""
    body = f"""## Separation quality (scripts/bench_separation.py)

SI-SDRi (and SI-SDR) in dB, mean over sources, microphones and held-out mixtures, machines
at equal level; {args.mixtures} mixtures per simulated row, {2 * args.mixtures} for the real one. The oracle
columns use the true sources: the best a mask (one microphone) or a linear spatial filter
(the array) of that kind can do, not a method. "oracle time-invariant filter" (one
microphone) is one gain per frequency for the whole 10 s from each true source's mean
power spectrum at {LONG_FFT} points: a filter that knows each machine's spectrum exactly
but not how it varies in time. Torch threads: {torch.get_num_threads()}.

### Simulated, one microphone (mic 0)
{hybrid_note}

{models(mono_facts, mono_times)}

{table(mono_rows, list(mono_rows[0][1]), "sources, background")}

NMF: {ms(mono_times['NMF']):.0f} ms per 10 s.

### Simulated, one microphone, one installation's own machines

The product's case: a separator trained on the machines it listens to. "installation
model" is trained in this run, {args.installation_minutes:g} minutes on 2 cores, starting from the
weights of `{args.mono}` (the "trained model" column; `train_separator.init: {args.mono}`), with the recipe of
scripts/plant_separator.yaml, on each machine of one installation recorded alone
(`simulate --training-set --unit {INSTALLATION}`: 24 clips per machine at random places,
distances and gains in that installation's room), and tested on other recordings of the
same machines (unit {INSTALLATION}, seeds from {TEST_SEED}). "trained model" is `{args.mono}` above
(trained on another machine in every clip) on the same mixtures; NMF's dictionaries
are learnt from the installation's recordings.

{models(own_facts, own_times, ("installation model",))}

{table(own_rows, list(own_rows[0][1]), "sources, background")}

### Simulated, array (the demo room, 4 microphones)

Model {array_facts}. "array model" is what `record` runs: the network, then the
multichannel Wiener filter with the spatial covariances learnt from the training
recordings (separation.spatial_iterations 2) and the room's from a noise clip of the same
installation, the room's power in each bin at most its level in that clip but where
what the network leaves is a transient (separation.room_headroom 1; the clip is at
the mixtures' gain, also where the room is missing from the mixture); "room uncapped"
the same with room_headroom null, the room taking all the network leaves; "array
network alone" is the network
without the filter. The per-microphone model is `{args.mono}` above, run on each channel.

{table(array_rows, list(array_rows[0][1]), "machines running, background")}

Time per 10 s of all 4 microphones: array model {ms(array_times['array model']):.0f} ms (network alone
{ms(array_times['array network alone']):.0f} ms), per-microphone
model {ms(array_times['per-microphone model']):.0f} ms, NMF {ms(array_times['NMF']):.0f} ms.

### Real recordings, one microphone

Trained in this run, {args.real_minutes:g} minutes each, on rail clips 0-79 and machine A clips 0-7
(every recording's last 15% of files held out for validation), tested on rail clips
80-99 mixed with machine A clips 8-9{"; the hybrid model with the hybrid recipe above" if hybrid else ""}.

{models(real_facts, real_times)}

{table(real_rows, list(real_rows[0][1]), "sources")}

NMF: {ms(real_times['NMF']):.0f} ms per 10 s.

### Targets

- Array, 2 sources at 0 dB, at least 10 dB and above NMF in every condition:
  {verdict(array_rows, 'array model', 10.0, two)}; all array rows above NMF:
  {verdict(array_rows, 'array model', -np.inf)}.
- One microphone, 2 sources, at least 6 dB and above NMF:
  {verdict(mono_rows, 'trained model', 6.0, two)}; all rows above NMF: {verdict(mono_rows, 'trained model', -np.inf)}.
- One microphone, one installation's own machines, 2 sources, at least 6 dB and above NMF:
  {verdict(own_rows, 'installation model', 6.0, two)}; all rows above NMF:
  {verdict(own_rows, 'installation model', -np.inf)}.
- Real mixtures, one microphone, at least 6 dB: {verdict(real_rows, 'trained model', 6.0)}.
"""
    if hybrid:
        body += f"""- The same for the hybrid model: one microphone {verdict(mono_rows, 'hybrid model', 6.0, two)}; all rows
  above NMF: {verdict(mono_rows, 'hybrid model', -np.inf)}; real mixtures {verdict(real_rows, 'hybrid model', 6.0)}.
"""
    print(body)
    print(f"written to {write_section('bench_separation', body)}")


if __name__ == "__main__":
    main()
