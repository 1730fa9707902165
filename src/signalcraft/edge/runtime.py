"""Running ONNX exports with ONNX Runtime: numpy in, numpy out, no torch.

An export (``export.py``) is a JSON manifest beside the original model file
(``detector.pt`` -> ``detector.onnx.json``, ``plant-b237e74a.th`` ->
``plant-b237e74a.onnx.json``) naming its ONNX files with their SHA-256, the SHA-256 of
the original it was made from, and what is needed to run it. Nothing in it is trusted:
the manifest is checked field by field, every ONNX file against its checksum before
ONNX Runtime parses it, and an export of another original (the model was retrained
since) is refused with the command that makes a new one.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import SignalcraftError
from ..files import sha256_file

log = logging.getLogger(__name__)

FORMAT = 1
MAX_MANIFEST_BYTES = 1_000_000
PRECISIONS = ("fp32", "int8")
EXPORT = "`signalcraft export-onnx`"
SECONDS_PER_RUN = 16.0  # separator audio per ONNX Runtime call, s: a bounded memory (more per call was slower)


class EdgeError(SignalcraftError):
    """An ONNX export is missing, damaged, stale or cannot run."""


def manifest_path(original: Path) -> Path:
    """Where the export of ``original`` is described: ``<stem>.onnx.json`` beside it."""
    original = Path(original)
    return original.with_name(original.stem + ".onnx.json")


def _need(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise EdgeError(f"{path}: damaged ONNX export manifest ({what}). Run {EXPORT} again.")


def read_manifest(original: Path, kind: str) -> dict[str, Any]:
    """The checked manifest of the export of ``original``, a ``kind`` ("detector" or
    "separator") export.

    Raises
    ------
    EdgeError
        No export, not JSON, a field missing or of the wrong type, another format or
        kind, or made from another version of ``original``. The message names the file
        and says what to run.
    """
    original = Path(original)
    path = manifest_path(original)
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise EdgeError(f"{path}: {path.stat().st_size} bytes is too large for an export manifest. Run {EXPORT} "
                            "again.")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeError(f"{path}: no ONNX export of {original.name} (compute.runtime is onnxruntime). Run {EXPORT}, "
                        "or set compute.runtime: torch.") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EdgeError(f"{path}: not a readable export manifest ({type(e).__name__}: {str(e)[:200]}). Run {EXPORT} "
                        "again.") from None
    _need(isinstance(data, dict), path, "not an object")
    _need(data.get("format") == FORMAT, path, f"format {data.get('format')!r}, this signalcraft reads {FORMAT}")
    _need(data.get("kind") == kind, path, f"kind {data.get('kind')!r}, expected {kind!r}")
    made_from = data.get("original")
    _need(isinstance(made_from, dict) and isinstance(made_from.get("sha256"), str), path, "original")
    if made_from["sha256"] != sha256_file(original):
        raise EdgeError(f"{path}: the ONNX export was made from another version of {original.name} (the model was "
                        f"trained or changed since). Run {EXPORT} again.")
    return data


def _artifact(manifest_file: Path, entry: Any) -> Path:
    """The ONNX file of a manifest entry {file, sha256}, checked."""
    _need(isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str),
          manifest_file, "an artifact without file and sha256")
    name = entry["file"]
    _need(Path(name).name == name and name.endswith(".onnx"), manifest_file, f"artifact name {name!r}")
    path = manifest_file.parent / name
    if not path.is_file():
        raise EdgeError(f"{path}: ONNX file missing (named by {manifest_file.name}). Run {EXPORT} again.")
    if sha256_file(path) != entry["sha256"]:
        raise EdgeError(f"{path}: ONNX file fails its checksum (damaged or replaced). Run {EXPORT} again.")
    return path


def session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session of ``path``; ``threads`` intra-op threads (0: its default).

    Raises
    ------
    EdgeError
        onnxruntime is not installed, or the file is not a model it can run.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise EdgeError("compute.runtime is onnxruntime but the onnxruntime package is not installed; run "
                        "scripts/setup.sh or set compute.runtime: torch.") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: the export's own shape hints are not news
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own classes for a bad file
        raise EdgeError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {str(e)[:200]}). Run {EXPORT} "
                        "again.") from None


def choose(entries: Any, precision: str, manifest_file: Path, what: str, names: dict[str, str]) -> Path:
    """The checked file of ``precision`` among ``entries`` ({fp32: ..., int8: ...}), each
    of which must have its name in ``names`` (precision -> file name). A part without an
    INT8 file (nothing in it quantised, or the result was not kept) runs its FP32 one."""
    _need(isinstance(entries, dict) and "fp32" in entries, manifest_file, f"{what} has no fp32 file")
    if precision not in entries:
        log.info("%s: %s has no %s export (export-onnx did not keep one); it runs the fp32 one", manifest_file.name,
                 what, precision)
        precision = "fp32"
    entry = entries[precision]
    _need(isinstance(entry, dict) and entry.get("file") == names[precision], manifest_file,
          f"the {precision} file of {what} is not {names[precision]}")
    return _artifact(manifest_file, entry)


class OnnxScorer:
    """The scoring paths of a detector's sources through ONNX Runtime.

    ``score(source, tensors)``: float32 dB tensors (N, 1, n_mels, n_frames) -> float64
    scores (N,), as the detector's own ``score`` gives them. ``not_exported``: source ->
    why it has no export (it is not a network); those keep their own scorer."""

    def __init__(self, detector_file: Path, precision: str = "fp32", threads: int = 1):
        data = read_manifest(detector_file, "detector")
        path = manifest_path(detector_file)
        sources = data.get("sources")
        _need(isinstance(sources, dict), path, "sources")
        not_exported = data.get("not_exported", {})
        _need(isinstance(not_exported, dict), path, "not_exported")
        self.not_exported = {str(k): str(v) for k, v in not_exported.items()}
        self.shape = data.get("shape")
        _need(isinstance(self.shape, list) and len(self.shape) == 3 and all(isinstance(v, int) and v > 0
                                                                            for v in self.shape), path, "shape")
        self.detector_kind = str(data.get("detector_kind"))
        self.file = path
        stem = Path(detector_file).stem
        self._sessions = {
            str(source): session(choose(entries, precision, path, f"source {source!r}",
                                        {"fp32": f"{stem}.{source}.onnx", "int8": f"{stem}.{source}.int8.onnx"}),
                                 threads)
            for source, entries in sources.items()}

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    def score(self, source: str, tensors) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(tensors, dtype=np.float32))
        if x.ndim != 4 or list(x.shape[1:]) != self.shape:
            raise EdgeError(f"{self.file}: tensors of shape {list(x.shape)} given, the export takes (N, "
                            f"{', '.join(map(str, self.shape))})")
        run = self._sessions[source]
        scores = run.run(None, {run.get_inputs()[0].name: x})[0]
        if scores.shape != (x.shape[0],):
            raise EdgeError(f"{self.file}: the export of {source!r} gives scores of shape {list(scores.shape)} for "
                            f"{x.shape[0]} tensors (not a scoring graph). Run {EXPORT} again.")
        return scores.astype(np.float64)


def demucs_valid_length(length: int, resample: bool, depth: int, kernel_size: int, stride: int) -> int:
    """``demucs.demucs.Demucs.valid_length``: the input length the model needs for
    ``length`` samples (its own rule, so an export pads every chunk as the model does)."""
    if resample:
        length *= 2
    for _ in range(depth):
        length = max(1, math.ceil((length - kernel_size) / stride) + 1)
    for _ in range(depth):
        length = (length - 1) * stride + kernel_size
    if resample:
        length = math.ceil(length / 2)
    return int(length)


def demucs_padding(model) -> dict[str, Any]:
    """The settings of a Demucs v2 ``model`` that ``demucs_valid_length`` takes (what an
    export records of how the model pads its input)."""
    return {"resample": bool(model.resample), "depth": int(model.depth), "kernel_size": int(model.kernel_size),
            "stride": int(model.stride)}


class OnnxSeparator:
    """A Demucs model's ONNX export run over a whole segment in chunks, as
    ``demucs.apply.apply_model`` runs it (``split=True``, no shifts): overlapping chunks
    of the model's segment length (or of ``segment`` seconds: the whole segment as one
    chunk), each padded with the audio around it (zeros beyond the ends) to the length
    the model needs, blended with demucs' triangular weights. The chunks of all examples
    go through the network together, ``SECONDS_PER_RUN`` of audio at a time (a batch of
    every chunk of 8 microphones held over a gigabyte of activations)."""

    def __init__(self, model_file: Path, precision: str = "fp32", threads: int = 0, checking: bool = False):
        data = read_manifest(model_file, "separator")
        path = manifest_path(model_file)
        m = data.get("model")
        _need(isinstance(m, dict), path, "model")
        try:
            self.sources = tuple(str(s) for s in m["sources"])
            self.samplerate = int(m["samplerate"])
            self.audio_channels = int(m["audio_channels"])
            self.segment = float(m["segment"])
            v = m["valid_length"]
            self._valid = dict(resample=bool(v["resample"]), depth=int(v["depth"]),
                               kernel_size=int(v["kernel_size"]), stride=int(v["stride"]))
        except (KeyError, TypeError, ValueError) as e:
            raise EdgeError(f"{path}: damaged ONNX export manifest (model: {e!r}). Run {EXPORT} again.") from None
        _need(self.sources and self.samplerate > 0 and self.audio_channels > 0 and self.segment > 0, path, "model")
        # ``checking``: export-onnx itself, comparing the export with torch before it says so.
        _need(checking or (isinstance(data.get("verified"), dict) and "fp32" in data["verified"]), path,
              "never checked against torch (export-onnx did not finish)")
        self.file = path
        stem = Path(model_file).stem
        self._session = session(choose(data.get("artifacts"), precision, path, "the separator",
                                       {"fp32": f"{stem}.onnx", "int8": f"{stem}.int8.onnx"}), threads)

    def valid_length(self, length: int) -> int:
        return demucs_valid_length(length, **self._valid)

    def check_model(self, model) -> None:
        """Refuse an export whose recorded model is not ``model`` (a demucs Demucs)."""
        recorded = (self.sources, self.samplerate, self.audio_channels, self.segment, self._valid)
        actual = (tuple(model.sources), int(model.samplerate), int(model.audio_channels), float(model.segment),
                  demucs_padding(model))
        if recorded != actual:
            raise EdgeError(f"{self.file}: the export's sources, rate, channels, chunk or padding are not the "
                            f"model's. Run {EXPORT} again.")

    def __call__(self, mix: np.ndarray, overlap: float = 0.25, segment: Optional[float] = None) -> np.ndarray:
        """(batch, audio_channels, T) float32 -> (batch, sources, audio_channels, T)."""
        batch, channels, total = mix.shape
        length = int(self.samplerate * (segment or self.segment))
        stride = int((1 - overlap) * length)
        weight = np.concatenate([np.arange(1, length // 2 + 1), np.arange(length - length // 2, 0, -1)])
        weight = (weight / weight.max()).astype(np.float32)
        chunks: dict[int, list[tuple[int, int]]] = {}  # chunk length -> [(offset, chunk length)]
        for offset in range(0, total, stride):
            n = min(length, total - offset)
            chunks.setdefault(n, []).append((offset, n))
        out = np.zeros((batch, len(self.sources), channels, total), np.float32)
        sum_weight = np.zeros(total, np.float32)
        name = self._session.get_inputs()[0].name
        for n, same_length in chunks.items():  # full chunks, then the last one
            valid = self.valid_length(n)
            delta = valid - n
            padded = np.zeros((len(same_length), batch, channels, valid), np.float32)
            for k, (offset, _) in enumerate(same_length):
                start = offset - delta // 2
                lo, hi = max(0, start), min(total, start + valid)
                padded[k, :, :, lo - start:hi - start] = mix[:, :, lo:hi]
            examples = padded.reshape(-1, channels, valid)  # (chunk, example) pairs
            per_run = max(1, int(SECONDS_PER_RUN * self.samplerate // valid))
            y = np.concatenate([self._session.run(None, {name: examples[k:k + per_run]})[0]
                                for k in range(0, len(examples), per_run)])
            y = y.reshape(len(same_length), batch, len(self.sources), channels, -1)
            trim = (y.shape[-1] - n) // 2
            y = y[..., trim:trim + n]
            for k, (offset, _) in enumerate(same_length):
                out[..., offset:offset + n] += weight[:n] * y[k]
                sum_weight[offset:offset + n] += weight[:n]
        return out / sum_weight


class EdgeScored:
    """A detector whose exported sources score through ONNX Runtime (``OnnxScorer``);
    the rest (what is not a network, such as the online scorer's forests) and
    everything else (learning, features, sources) stay the detector's own."""

    runtime = "onnxruntime"

    def __init__(self, detector, onnx: OnnxScorer):
        if onnx.detector_kind != detector.kind:
            raise EdgeError(f"{onnx.file}: an export of a {onnx.detector_kind} detector, the detector is "
                            f"{detector.kind}. Run {EXPORT} again.")
        missing = [s for s in detector.sources if s not in onnx.sources and s not in onnx.not_exported]
        if missing:
            raise EdgeError(f"{onnx.file}: the export has no model of {', '.join(map(repr, missing))} and does not say "
                            f"why. Run {EXPORT} again.")
        self.detector = detector
        self.onnx = onnx

    def __getattr__(self, name: str):
        return getattr(self.detector, name)

    def score(self, source: str, tensors, state=None) -> np.ndarray:
        if source in self.onnx.sources:
            return self.onnx.score(source, tensors)
        if getattr(self.detector, "learns_online", False):
            return self.detector.score(source, tensors, state=state)
        return self.detector.score(source, tensors)
