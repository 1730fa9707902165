"""ONNX export and ONNX Runtime: exported detectors and separators give torch's results,
and a missing, damaged, stale or crafted export is refused naming its file."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from signalcraft import clock
from signalcraft.config import DetectConfig, ScorerConfig, SeparationConfig, config_from_dict
from signalcraft.detect.model import load_detector, save_detector
from signalcraft.detect.scorers import fit_detector
from signalcraft.edge.export import SCORE_TOLERANCE, export_detector, export_separator
from signalcraft.edge.runtime import EdgeError, EdgeScored, OnnxScorer, OnnxSeparator, manifest_path
from signalcraft.separate import load_separator, model_file, save_model

from conftest import SAMPLE_RATE, SETTINGS, add_recordings, invoke, tiny_demucs

FEATURES = {"kind": "log-mel", "n_mels": 32, "n_frames": 32}


def tensors(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 32, 32, generator=g) * 4 - 40).float()


def fitted(tmp_path, kind: str, sources=("pump",)):
    config = DetectConfig(scorer=ScorerConfig(kind=kind))
    if kind == "autoencoder":
        config = dataclasses.replace(config, scorer=dataclasses.replace(
            config.scorer, autoencoder=dataclasses.replace(config.scorer.autoencoder, epochs=2)))
    data = {source: tensors(10, k) + 3 * k for k, source in enumerate(sources)}
    path = save_detector(fit_detector(data, FEATURES, config), tmp_path / "detector.pt")
    return load_detector(path), path


# ensemble: its members profile and modulation in one graph; frames: the window axis of
# the Gaussian kinds (bands and modulation have none); autoencoder: the network.
@pytest.mark.parametrize("kind,sources", [("ensemble", ("pump",)), ("frames", ("pump",)),
                                          ("autoencoder", ("pump",))])
def test_an_exported_detector_scores_as_torch_does(tmp_path, kind, sources):
    detector, path = fitted(tmp_path, kind, sources)
    report = export_detector(detector, path, {s: tensors(6, 2 + k) + 3 * k for k, s in enumerate(sources)}, int8=True)
    assert set(report["sources"]) == set(sources) and not report["not_exported"]
    onnx = OnnxScorer(path)
    new = tensors(5, 7)
    for source in sources:
        expected = detector.score(source, new)
        np.testing.assert_allclose(onnx.score(source, new.numpy()), expected, rtol=SCORE_TOLERANCE)
    if kind == "autoencoder":  # the convolutions quantise; the float64 Gaussians have nothing to
        assert "int8" in report["sources"]["pump"]["files"]
        int8 = OnnxScorer(path, "int8").score("pump", new.numpy())
        np.testing.assert_allclose(int8, detector.score("pump", new), rtol=0.05)
    else:  # nothing quantised: compute.precision int8 runs the fp32 file
        assert "int8" not in report["sources"]["pump"]["files"]
        np.testing.assert_array_equal(OnnxScorer(path, "int8").score("pump", new.numpy()),
                                      onnx.score("pump", new.numpy()))


def test_the_online_scorer_is_named_and_keeps_its_own_forests(tmp_path):
    detector, path = fitted(tmp_path, "online")
    report = export_detector(detector, path, {"pump": tensors(4)})
    assert not report["sources"] and "not a network" in report["not_exported"]["pump"]
    scored = EdgeScored(detector, OnnxScorer(path))
    new = tensors(2, 5)
    np.testing.assert_array_equal(scored.score("pump", new), detector.score("pump", new))


def test_a_missing_damaged_stale_or_crafted_export_is_refused_naming_the_file(tmp_path):
    detector, path = fitted(tmp_path, "profile", ("pump", "fan"))
    with pytest.raises(EdgeError, match=r"detector\.onnx\.json: no ONNX export of detector\.pt.*export-onnx"):
        OnnxScorer(path)
    export_detector(detector, path, {"pump": tensors(4), "fan": tensors(4)})
    manifest = manifest_path(path)
    onnx_file = tmp_path / "detector.pump.onnx"

    damaged = bytearray(onnx_file.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    good = onnx_file.read_bytes()
    onnx_file.write_bytes(bytes(damaged))
    with pytest.raises(EdgeError, match=r"detector\.pump\.onnx: ONNX file fails its checksum"):
        OnnxScorer(path)
    onnx_file.unlink()
    with pytest.raises(EdgeError, match=r"detector\.pump\.onnx: ONNX file missing"):
        OnnxScorer(path)
    onnx_file.write_bytes(good)
    OnnxScorer(path)

    text = manifest.read_text()
    data = json.loads(text)
    data["sources"]["pump"]["fp32"]["file"] = "../../etc/passwd.onnx"  # outside the model's folder
    manifest.write_text(json.dumps(data))
    with pytest.raises(EdgeError, match=r"detector\.onnx\.json: damaged ONNX export manifest \(the fp32 file of "
                                        r"source 'pump' is not detector\.pump\.onnx"):
        OnnxScorer(path)
    data["sources"] = {}  # a source neither exported nor said why
    manifest.write_text(json.dumps(data))
    with pytest.raises(EdgeError, match=r"detector\.onnx\.json: the export has no model of 'fan', 'pump' and "
                                        r"does not say why"):
        EdgeScored(detector, OnnxScorer(path))
    manifest.write_text("{not json")
    with pytest.raises(EdgeError, match=r"detector\.onnx\.json: not a readable export manifest"):
        OnnxScorer(path)
    manifest.write_text(text)

    # The detector retrained since the export: its scores would be another model's.
    save_detector(fit_detector({"pump": tensors(10, 9)}, FEATURES, DetectConfig(scorer=ScorerConfig(kind="profile"))),
                  path)
    with pytest.raises(EdgeError, match=r"made from another version of detector\.pt.*export-onnx"):
        OnnxScorer(path)


@pytest.fixture(scope="module")
def exported_separator(tmp_path_factory):
    """A project with a tiny separator and no detector yet, after `export-onnx`: the
    separator is exported alone (checked on a test signal, there being no recordings)."""
    project = tmp_path_factory.mktemp("separator")
    save_model(tiny_demucs(resample=False), project / "models", "tiny")  # at the capture rate, as train-separator makes them
    (project / "config.yaml").write_text(yaml.safe_dump({
        "capture": {"channels": [1, 2]}, "separation": {"repo": "models", "model": "tiny"},
        "output": {"dir": "out"}, "compute": {"runtime": "onnxruntime"}}))
    result = invoke("--config", str(project / "config.yaml"), "export-onnx", str(project / "out"), "--no-int8")
    return project, result


def test_export_onnx_before_the_first_detector_exports_the_separator_alone(exported_separator):
    project, result = exported_separator
    assert result.returncode == 0, result.stderr
    assert "no detector yet, not exported" in result.stdout
    assert "separator tiny: fp32 tiny-" in result.stdout and "on a test signal" in result.stdout
    OnnxSeparator(model_file(project / "models", "tiny"))  # complete and checked


def test_an_exported_separator_separates_as_torch_does(exported_separator, tmp_path, monkeypatch):
    save_model(tiny_demucs(resample=True), tmp_path / "doubled", "tiny")
    with pytest.raises(EdgeError, match="doubles the sample rate inside"):
        export_separator(model_file(tmp_path / "doubled", "tiny"), np.zeros((1, 1, SAMPLE_RATE), np.float32))
    shutil.copytree(exported_separator[0] / "models", tmp_path / "models")
    path = model_file(tmp_path / "models", "tiny")
    report = json.loads(manifest_path(path).read_text())
    assert report["verified"]["fp32"] < 1e-3
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal((3, 2 * SAMPLE_RATE + 123))).astype(np.float32)
    # Whole segments in one pass (the default), and the model's chunks with a last, shorter one.
    for segment in ("whole", None):
        config = SeparationConfig(repo=tmp_path / "models", model="tiny", device="cpu", segment=segment)
        on_torch = load_separator(config, SAMPLE_RATE)
        on_onnx = load_separator(config, SAMPLE_RATE, runtime="onnxruntime")
        assert (on_torch.runtime, on_onnx.runtime) == ("torch", "onnxruntime")
        expected = on_torch(audio)
        np.testing.assert_allclose(on_onnx(audio), expected, atol=1e-4 * float(np.abs(expected).max()))

    # An export whose recorded model is not the model (edited, or of another model).
    text = manifest_path(path).read_text()
    data = json.loads(text)
    data["model"]["valid_length"]["depth"] = 1
    manifest_path(path).write_text(json.dumps(data))
    with pytest.raises(EdgeError, match=r"not the model's"):
        load_separator(config, SAMPLE_RATE, runtime="onnxruntime")
    del data["verified"]  # export-onnx stopped before its check
    data["model"]["valid_length"]["depth"] = 2
    manifest_path(path).write_text(json.dumps(data))
    with pytest.raises(EdgeError, match=r"never checked against torch"):
        load_separator(config, SAMPLE_RATE, runtime="onnxruntime")
    manifest_path(path).write_text(text)

    exports = {f.name: f.read_bytes() for f in path.parent.glob("*.onnx")}
    for f in path.parent.glob("*.onnx"):
        f.unlink()
    with pytest.raises(EdgeError, match=r"tiny-\w+\.onnx: ONNX file missing.*export-onnx"):
        OnnxSeparator(path)
    manifest_path(path).unlink()
    with pytest.raises(EdgeError, match=r"no ONNX export of tiny-\w+\.th"):
        load_separator(config, SAMPLE_RATE, runtime="onnxruntime")

    # A check that fails leaves no export behind, not an unchecked one. The network is
    # the one exported above, so its ONNX file is written from there (the exporter takes
    # seconds and is not what this checks).
    monkeypatch.setattr("signalcraft.edge.export.SEPARATION_TOLERANCE", -1.0)
    monkeypatch.setattr("signalcraft.edge.export._quiet_export",
                        lambda module, example, tmp, time_axis=False: tmp.write_bytes(exports[f"{path.stem}.onnx"]))
    with pytest.raises(EdgeError, match="differs from torch's"):
        export_separator(path, np.zeros((1, 1, SAMPLE_RATE), np.float32) + 0.1, int8=False)
    assert not list(path.parent.glob("*.onnx")) and not manifest_path(path).exists()


def test_detect_on_onnxruntime_gives_the_torch_scores_and_reexports_what_it_trains(calibrated, tmp_path):
    """The CLI end to end: export-onnx, then detect with compute.runtime: onnxruntime on a
    copy of a calibrated project scores exactly as detect on torch does."""
    root, *_ = calibrated
    runs = {}
    ending = clock.now() - dt.timedelta(minutes=1)  # the same segment folders in both projects
    for runtime in ("torch", "onnxruntime"):
        project = tmp_path / runtime
        shutil.copytree(root, project)
        settings = {**SETTINGS, "compute": {"runtime": runtime}}
        (project / "config.yaml").write_text(yaml.safe_dump(settings))
        config = config_from_dict(settings, project / "config.yaml")
        if runtime == "onnxruntime":
            exported = invoke("--config", str(project / "config.yaml"), "export-onnx", str(project / "out"))
            assert exported.returncode == 0, exported.stderr
            assert "mix: fp32 detector.mix.onnx" in exported.stdout and "largest relative score difference" \
                in exported.stdout
            doctor = invoke("--config", str(project / "config.yaml"), "doctor", "-o", str(project / "out"))
            assert "scoring on onnxruntime fp32 for 1 of 1 sources" in doctor.stdout, doctor.stdout
        add_recordings(project, config, [100, 101], fault="bearing", ending=ending)
        result = invoke("--config", str(project / "config.yaml"), "detect", str(project / "out"), "--csv")
        assert result.returncode in (3, 4), result.stderr
        runs[runtime] = [row.split(",") for row in result.stdout.strip().splitlines()]
    torch_rows, onnx_rows = runs["torch"], runs["onnxruntime"]
    header = torch_rows[0]
    score = header.index("score")
    assert [r[:score] for r in onnx_rows] == [r[:score] for r in torch_rows]
    np.testing.assert_allclose([float(r[score]) for r in onnx_rows[1:]], [float(r[score]) for r in torch_rows[1:]],
                               rtol=1e-6)
    # train-detector on onnxruntime exports the detector it trains; an export of another
    # detector file is refused by detect, naming the file.
    project = tmp_path / "onnxruntime"
    before = json.loads(manifest_path(project / "detector.pt").read_text())["original"]["sha256"]
    retrained = invoke("--config", str(project / "config.yaml"), "train-detector", str(project / "out"))
    assert retrained.returncode == 0, retrained.stderr
    OnnxScorer(project / "detector.pt")  # fresh: made from the new file
    assert json.loads(manifest_path(project / "detector.pt").read_text())["original"]["sha256"] != before
    backup = next(project.glob("detector.pt.*.bak"))
    shutil.copyfile(backup, project / "detector.pt")
    stale = invoke("--config", str(project / "config.yaml"), "detect", str(project / "out"))
    assert stale.returncode == 1 and "detector.onnx.json" in stale.stderr and "export-onnx" in stale.stderr
