"""Export of the trained networks to ONNX, checked against torch, and INT8 quantisation.

``export_detector`` writes each source's scoring path (the kind's ``scoring_module``:
tensors in, scores out, in one graph) and ``export_separator`` the Demucs network, each
beside its original with a manifest (``runtime.manifest_path``). Each export is run by
ONNX Runtime on the verification data and compared with torch before the manifest is
written: the largest difference goes into the manifest and the report, and an export
that disagrees by more than its tolerance is refused. INT8: ONNX Runtime's static QDQ
quantisation calibrated on the same data, kept only when it quantised something (a
graph computed in float64, such as a Gaussian scorer's, has nothing to quantise).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .. import __version__, clock
from ..files import atomic_write, sha256_file
from .runtime import FORMAT, EdgeError, OnnxSeparator, demucs_padding, demucs_valid_length, manifest_path, session

log = logging.getLogger(__name__)

# Largest relative score difference of an FP32 export from torch (float64 graphs agree to
# about 1e-12; float32 networks to about 1e-5).
SCORE_TOLERANCE = 1e-3
# Largest difference of the FP32 separator export from torch, relative to the output's RMS.
SEPARATION_TOLERANCE = 1e-3
# An INT8 separator further from torch than this (of the output's RMS; 0.1 is 20 dB below
# the signal) is not kept.
SEPARATION_INT8_TOLERANCE = 0.1
CALIBRATION_BATCHES = 16  # examples the INT8 calibration reads
# The operators INT8 quantises: the convolutions and matrix products that hold the weights.
QUANTISED_OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm"]


@contextlib.contextmanager
def _loggers_quiet(names=("torch", "torch.__trace", "torch.onnx", "torch.export", "onnxscript", "onnx_ir")):
    """The exporter's and optimiser's loggers at ERROR (they report every rewrite at INFO)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quiet_export(module: torch.nn.Module, example: torch.Tensor, path: Path, time_axis: bool = False) -> None:
    """``torch.onnx.export`` (the dynamo exporter) with a free batch axis (and time axis),
    the weights inside the file, its progress lines and warnings kept out of the log."""
    axes = {0: "batch", 2: "time"} if time_axis else {0: "batch"}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _loggers_quiet():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), input_names=["input"], output_names=["output"],
                                    dynamic_axes={"input": axes, "output": axes}, dynamo=True,
                                    external_data=False, verbose=False)
        program.save(str(path), external_data=False)


def _written(path: Path, make: Callable[[Path], None]) -> dict[str, Any]:
    """Make ``path`` atomically; its entry {file, sha256, bytes}."""
    atomic_write(path, make)
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


class _Reader:
    """ONNX Runtime's calibration data reader over a list of inputs."""

    def __init__(self, name: str, inputs: list[np.ndarray]):
        self._items = iter([{name: x} for x in inputs])

    def get_next(self):
        return next(self._items, None)


def quantise(fp32: Path, int8: Path, inputs: list[np.ndarray]) -> Optional[dict[str, Any]]:
    """Static QDQ INT8 quantisation of ``fp32`` calibrated on ``inputs``, to ``int8``; its
    entry, or None when nothing in the graph could be quantised (no file is left)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # the calibrator's own sessions: errors only
    name = session(fp32).get_inputs()[0].name

    def make(tmp: Path) -> None:
        prepared = tmp.with_name(tmp.name + ".pre.onnx")
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _loggers_quiet(("root",)):
                warnings.simplefilter("ignore")
                quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
                quantize_static(str(prepared), str(tmp), _Reader(name, inputs), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax, per_channel=True,
                                op_types_to_quantize=QUANTISED_OPS)
        finally:
            prepared.unlink(missing_ok=True)

    entry = _written(int8, make)
    if not any(node.op_type == "QuantizeLinear" for node in onnx.load(str(int8)).graph.node):
        int8.unlink()
        return None
    return entry


def _write_manifest(original: Path, data: dict[str, Any]) -> Path:
    path = manifest_path(original)
    text = json.dumps({"format": FORMAT, **data, "signalcraft_version": __version__, "exported_utc": clock.now_iso()},
                      indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
    return path


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-9))) if a.size else 0.0


def export_detector(detector, detector_file: Path, tensors_by_source: dict[str, torch.Tensor],
                    int8: bool = True) -> dict[str, Any]:
    """Export every source's scoring path of ``detector`` (loaded from ``detector_file``)
    beside it, checked on ``tensors_by_source`` (normal tensors, e.g. the calibration
    segments'), which also calibrate the INT8 quantisation.

    Returns
    -------
    dict
        The report: per source the files, sizes, and the largest relative score
        difference of each precision from torch; ``not_exported``: source -> reason.

    Raises
    ------
    EdgeError
        An FP32 export disagrees with torch.
    """
    from ..detect.model import DetectorError

    detector_file = Path(detector_file)
    stem = detector_file.stem
    sources: dict[str, Any] = {}
    report: dict[str, Any] = {"sources": {}, "not_exported": {}}
    fallback = next((x for x in tensors_by_source.values() if x.shape[0]), None)
    if fallback is None:
        raise EdgeError(f"{detector_file}: no tensors to check the export on.")
    shape = list(fallback.shape[1:])
    for source in detector.sources:
        # A source without tensors of its own (a recalibration refits one machine) is
        # checked on another's: the agreement of two runtimes does not need its data.
        x = tensors_by_source.get(source, fallback)
        try:
            module = detector.scoring_module(source)
        except (AttributeError, DetectorError) as e:
            reason = str(e) if isinstance(e, DetectorError) else f"the {detector.kind} scorer is not a network"
            report["not_exported"][source] = f"{reason}; it keeps its own scorer"
            continue
        x = x.to(torch.float32).contiguous()
        began = time.monotonic()
        with torch.no_grad():
            expected = detector.score(source, x)
        entries = {"fp32": _written(detector_file.with_name(f"{stem}.{source}.onnx"),
                                    lambda tmp: _quiet_export(module, x[:2], tmp))}
        fp32 = detector_file.with_name(entries["fp32"]["file"])
        got = _run(fp32, x.numpy())
        difference = {"fp32": _relative_difference(got, expected)}
        if not difference["fp32"] <= SCORE_TOLERANCE:
            fp32.unlink()
            raise EdgeError(f"{fp32}: ONNX Runtime's scores of {source!r} differ from torch's by "
                            f"{difference['fp32']:.3g} (relative); not exported.")
        if int8:
            inputs = [x[k:k + 1].numpy() for k in range(min(CALIBRATION_BATCHES, x.shape[0]))]
            entry = quantise(fp32, detector_file.with_name(f"{stem}.{source}.int8.onnx"), inputs)
            if entry is not None:
                entries["int8"] = entry
                difference["int8"] = _relative_difference(_run(detector_file.with_name(entry["file"]), x.numpy()),
                                                          expected)
        sources[source] = entries
        report["sources"][source] = {"files": entries, "max_relative_difference": difference,
                                     "tensors_checked": int(x.shape[0]), "seconds": time.monotonic() - began}
        log.info("exported %s of %s: %s, largest score difference from torch %s", source, detector_file.name,
                 ", ".join(f"{p} {e['bytes'] / 1e6:.2f} MB" for p, e in entries.items()),
                 ", ".join(f"{p} {d:.2g}" for p, d in difference.items()))
    _write_manifest(detector_file, {
        "kind": "detector", "detector_kind": detector.kind, "shape": shape, "features": dict(detector.features),
        "original": {"file": detector_file.name, "sha256": sha256_file(detector_file)},
        "sources": sources, "not_exported": report["not_exported"],
        "verified": {s: r["max_relative_difference"] for s, r in report["sources"].items()},
    })
    report["manifest"] = str(manifest_path(detector_file))
    return report


def _run(path: Path, x: np.ndarray, batch: int = 32) -> np.ndarray:
    s = session(path)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[k:k + batch]})[0] for k in range(0, x.shape[0], batch)]
                          ).astype(np.float64)


def not_exportable(model) -> Optional[str]:
    """Why ``model`` (a demucs model) cannot be exported, or None when it can."""
    from demucs.demucs import Demucs

    if type(model) is not Demucs:
        return (f"a {type(model).__name__} model: export-onnx exports Demucs (v2) separators, the kind "
                "train-separator makes by default (train_separator.architecture: demucs)")
    if model.resample:
        return ("the model doubles the sample rate inside (demucs' resample), which does not export for chunks of "
                "any length; train-separator's models run at the capture rate")
    valid = demucs_padding(model)
    if any(demucs_valid_length(n, **valid) != model.valid_length(n) for n in (1, 100, 1023, 16000, 44100)):
        return "this demucs pads its input by another rule than export-onnx knows"
    return None


def export_separator(model_file: Path, audio: np.ndarray, overlap: float = 0.25, int8: bool = True
                     ) -> dict[str, Any]:
    """Export the Demucs network of ``model_file`` beside it, checked on ``audio``
    (float32, (examples, audio_channels, samples) at the model's rate): ONNX Runtime
    through ``OnnxSeparator`` against demucs' ``apply_model``, in the model's chunks and
    with each example in one pass; the larger difference counts.

    Raises
    ------
    EdgeError
        The model is not a Demucs v2 network (HDemucs and HTDemucs pad by their own
        rules and stay on torch), or the export disagrees with torch.
    """
    from demucs.apply import apply_model

    from ..separate import one_pass_seconds, read_model

    model_file = Path(model_file)
    model = read_model(model_file).eval()
    why = not_exportable(model)
    if why:
        raise EdgeError(f"{model_file}: not exported: {why}. With compute.runtime: onnxruntime it runs on torch "
                        "(logged); the detector's export does not depend on it.")
    valid = demucs_padding(model)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.shape[1] != model.audio_channels:
        if model.audio_channels != 1:
            raise EdgeError(f"{model_file}: an array model of {model.audio_channels} microphones, checked on audio of "
                            f"{audio.shape[1]}; record the channels it was trained on (capture.channels).")
        audio = audio.reshape(-1, 1, audio.shape[-1])  # a mono model separates each microphone on its own
    length = int(model.samplerate * model.segment)
    stem = model_file.stem
    meta = {"sources": list(model.sources), "samplerate": int(model.samplerate),
            "audio_channels": int(model.audio_channels), "segment": float(model.segment), "valid_length": valid}
    artifacts: dict[str, Any] = {}
    verified: dict[str, float] = {}
    refused: dict[str, str] = {}

    def manifest() -> None:
        _write_manifest(model_file, {"kind": "separator", "model": meta, "artifacts": artifacts, "verified": verified,
                                     "refused": refused,
                                     "original": {"file": model_file.name, "sha256": sha256_file(model_file)}})

    # Scaled as the separator scales its input (unit standard deviation), and long enough
    # for a last chunk shorter than the others (the export runs it at its own length).
    audio = audio / np.maximum(audio.std(axis=(1, 2), keepdims=True), 1e-8)
    if audio.shape[-1] % int((1 - overlap) * length) == 0 or audio.shape[-1] <= length:
        audio = np.concatenate([audio, audio[..., :length // 3 + 1]], axis=-1)
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    # Both ways the separator runs: in the model's chunks, and each example in one pass
    # (separation.segment: whole).
    ways = {"chunks": (overlap, None), "whole": (0.0, one_pass_seconds(x.shape[-1], model.samplerate))}
    with torch.no_grad():
        expected = {way: apply_model(model, x, shifts=0, split=True, overlap=o, segment=seg, progress=False).numpy()
                    for way, (o, seg) in ways.items()}
    rms = float(np.sqrt(np.mean(expected["chunks"] ** 2))) or 1.0

    def difference(precision: str) -> float:
        run = OnnxSeparator(model_file, precision, checking=True)
        return max(float(np.max(np.abs(run(x.numpy(), o, seg) - expected[way]))) / rms
                   for way, (o, seg) in ways.items())

    # Until the check is done the manifest has no fp32 entry under "verified", which the
    # runtime refuses; a failure or an interruption removes the export altogether.
    try:
        example = torch.zeros(2, model.audio_channels, model.valid_length(length))
        artifacts["fp32"] = _written(model_file.with_name(f"{stem}.onnx"),
                                     lambda tmp: _quiet_export(model, example, tmp, time_axis=True))
        manifest()
        fp32 = difference("fp32")
        if not fp32 <= SEPARATION_TOLERANCE:
            raise EdgeError(f"{model_file}: the ONNX export's separation differs from torch's by {fp32:.3g} of the "
                            "output's RMS; not exported.")
        if int8:
            inputs = []
            for k in range(min(CALIBRATION_BATCHES, x.shape[0] * max(1, x.shape[-1] // length))):
                example_k, offset = divmod(k, max(1, x.shape[-1] // length))
                chunk = np.zeros((1, model.audio_channels, model.valid_length(length)), np.float32)
                piece = x[example_k % x.shape[0], :, offset * length:(offset + 1) * length].numpy()
                chunk[0, :, :piece.shape[-1]] = piece
                inputs.append(chunk)
            entry = quantise(model_file.with_name(artifacts["fp32"]["file"]),
                             model_file.with_name(f"{stem}.int8.onnx"), inputs)
            if entry is not None:
                artifacts["int8"] = entry
                manifest()
                verified["int8"] = difference("int8")
                if not verified["int8"] <= SEPARATION_INT8_TOLERANCE:
                    log.warning("%s: the INT8 separator differs from torch by %.3g of the output's RMS (more than %g): "
                                "not kept; use fp32", model_file.name, verified["int8"], SEPARATION_INT8_TOLERANCE)
                    model_file.with_name(artifacts.pop("int8")["file"]).unlink()
                    refused["int8"] = f"differs from torch by {verified['int8']:.3g} of the output's RMS"
            else:
                refused["int8"] = "nothing in the graph quantised"
        verified["fp32"] = fp32
        manifest()
    except BaseException:
        manifest_path(model_file).unlink(missing_ok=True)
        for entry in artifacts.values():
            model_file.with_name(entry["file"]).unlink(missing_ok=True)
        raise
    log.info("exported %s: %s; largest difference from torch, of the output's RMS: %s", model_file.name,
             ", ".join(f"{p} {e['bytes'] / 1e6:.2f} MB" for p, e in artifacts.items()),
             ", ".join(f"{p} {d:.2g}" for p, d in verified.items()))
    return {"files": artifacts, "max_difference_of_rms": verified, "refused": refused,
            "manifest": str(manifest_path(model_file))}
