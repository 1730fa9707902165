"""What operators do, end to end through the CLI and the real state file: acknowledge a
machine, label segments, record maintenance (and the recalibration that follows), the
retention of alarm evidence, and the HTML report rendered in headless Chromium."""

import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from signalcraft import clock
from signalcraft.config import config_from_dict
from signalcraft.detect.model import load_detector
from signalcraft.detect.recalibrated import RecalibratedDetector
from signalcraft.detect.run import trainable
from signalcraft.detect.store import Store
from signalcraft.errors import ExitCode
from signalcraft.segments import folder_name, list_segments

from conftest import DEFAULT_ALERTS, SETTINGS, add_recordings as add, invoke


def cli(project: Path, *args: str):
    return invoke("--config", str(project / "config.yaml"), *args)


def detect_json(project: Path) -> tuple[int, dict]:
    result = cli(project, "detect", str(project / "out"), "--json")
    return result.returncode, json.loads(result.stdout)


def test_ack_silences_a_machine_until_its_state_changes(copy):
    project, config = copy
    add(project, config, range(700, 703), "bearing")
    code, out = detect_json(project)
    assert code == ExitCode.CRITICAL, out["machines"]
    assert out["machines"][0]["source"] == "mix" and not out["machines"][0]["acknowledged"]

    acked = cli(project, "ack", "mix", "--output", str(project / "out"), "--note", "bearing noise, fitter booked")
    assert acked.returncode == 0, acked.stderr
    assert "mix CRITICAL acknowledged" in acked.stdout

    add(project, config, [703], "bearing")  # still CRITICAL: silent
    quiet = cli(project, "-q", "detect", str(project / "out"))
    assert quiet.returncode == 0 and quiet.stdout == "", quiet.stdout + quiet.stderr
    first = list_segments(project / "out")[0].start_time.isoformat()
    table = cli(project, "detect", str(project / "out"), "--since", first)
    assert "CRITICAL*" in table.stdout and "acknowledged" in table.stdout

    back = add(project, config, range(610, 612))  # normal again: the acknowledgement ends
    normal = cli(project, "-v", "detect", str(project / "out"))
    assert normal.returncode == 0
    assert f"mix: CRITICAL -> NORMAL in {back[0]}" in normal.stderr  # the log records each change of state
    assert f"the acknowledgement of CRITICAL ends: NORMAL in {back[0]}" in normal.stderr
    add(project, config, [704], "bearing")  # a new alarm is not silenced
    assert cli(project, "detect", str(project / "out")).returncode in (ExitCode.WARNING, ExitCode.CRITICAL)
    with Store(project / "out" / "signalcraft.sqlite") as store:
        (ack,) = store.acks()
        assert ack["status"] == "CRITICAL" and ack["note"] == "bearing noise, fitter booked"
        assert ack["ended_folder"] and store.active_ack("mix") is None


def test_ack_refuses_an_unknown_or_normal_machine(copy):
    project, config = copy
    unknown = cli(project, "ack", "P-999", "-o", str(project / "out"))
    assert unknown.returncode == ExitCode.FAILURE and "no machine 'P-999'" in unknown.stderr
    assert "Known machines: mix" in unknown.stderr
    add(project, config, [612])
    assert cli(project, "detect", str(project / "out")).returncode == 0
    normal = cli(project, "ack", "mix", "-o", str(project / "out"))
    assert normal.returncode == ExitCode.FAILURE and "mix is NORMAL: there is no alarm" in normal.stderr


def test_retention_keeps_alarm_evidence_until_acknowledged_or_labelled(copy):
    project, config = copy
    settings = {**SETTINGS, "output": {"dir": "out", "keep_days": 1e-9}}  # everything is old enough to go
    (project / "config.yaml").write_text(yaml.safe_dump(settings))
    (faulty,) = add(project, config, [730], "bearing")
    # An alert; retention deleted every other segment.
    assert cli(project, "detect", str(project / "out")).returncode in (ExitCode.WARNING, ExitCode.CRITICAL)
    left = [s.name for s in list_segments(project / "out")]
    assert left == [faulty]
    dry = cli(project, "prune", str(project / "out"), "--dry-run")
    assert dry.returncode == 0 and "would delete" not in dry.stdout
    assert "1 because their alerts are not acknowledged" in dry.stdout

    labelled = cli(project, "label", faulty, "anomaly", "-o", str(project / "out"), "-m", "bearing confirmed")
    assert labelled.returncode == 0 and "labelled anomaly" in labelled.stdout, labelled.stderr
    dry = cli(project, "prune", str(project / "out"), "--dry-run")
    assert f"would delete {project / 'out' / faulty}" in dry.stdout


def test_a_lone_segment_above_the_warning_level_is_no_alert_and_not_trained_on_unless_labelled(copy):
    project, config = copy
    (project / "config.yaml").write_text(yaml.safe_dump(DEFAULT_ALERTS))  # WARNING: 3 of 5
    config = config_from_dict(DEFAULT_ALERTS, project / "config.yaml")
    normal = add(project, config, range(620, 625))
    (lone,) = add(project, config, [750], "bearing")
    assert cli(project, "detect", str(project / "out")).returncode == 0  # no alert
    with Store(project / "out" / "signalcraft.sqlite") as store:
        assert lone in store.above_warning_folders() and lone not in store.alert_folders()
        kept = {s.name for s in trainable(store, list_segments(project / "out"))}
    assert lone not in kept and set(normal) <= kept
    assert cli(project, "label", lone, "normal", "-o", str(project / "out")).returncode == 0
    with Store(project / "out" / "signalcraft.sqlite") as store:
        assert lone in {s.name for s in trainable(store, list_segments(project / "out"))}


def test_labels_decide_what_train_detector_trains_on(copy):
    project, config = copy
    false_alarm, fault = add(project, config, [740, 741], "bearing")
    normal = add(project, config, range(610, 613))
    assert cli(project, "detect", str(project / "out")).returncode != 0
    assert cli(project, "label", false_alarm, "normal", "-o", str(project / "out")).returncode == 0
    with Store(project / "out" / "signalcraft.sqlite") as store:
        kept = {s.name for s in trainable(store, list_segments(project / "out"))}
    assert false_alarm in kept and fault not in kept and set(normal) <= kept

    assert cli(project, "label", str(project / "out" / fault), "anomaly", "-o", str(project / "out")).returncode == 0
    with Store(project / "out" / "signalcraft.sqlite") as store:
        assert store.labels()[fault] == "anomaly"
    bad = cli(project, "label", "not-a-segment", "normal", "-o", str(project / "out"))
    assert bad.returncode == ExitCode.FAILURE and "not a segment folder's name" in bad.stderr
    never = folder_name(list_segments(project / "out")[0].start_time - dt.timedelta(days=1))  # not recorded
    unknown = cli(project, "label", never, "normal", "-o", str(project / "out"))
    assert unknown.returncode == ExitCode.FAILURE and f"no segment {never}" in unknown.stderr

    trained = cli(project, "train-detector", str(project / "out"))
    assert trained.returncode == 0, trained.stderr


def test_maintenance_recalibrates_the_machine_on_the_segments_after_it(copy):
    project, config = copy
    settings = {**SETTINGS, "detect": {**SETTINGS["detect"], "calibration_segments": 5}}
    (project / "config.yaml").write_text(yaml.safe_dump(settings))
    config = config_from_dict(settings, project / "config.yaml")
    before = load_detector(project / "detector.pt")
    at = clock.now() + dt.timedelta(minutes=1)  # the machine is back in service then
    done = cli(project, "maintenance", "mix", "--note", "bearing replaced", "--at", at.isoformat(),
               "-o", str(project / "out"))
    assert done.returncode == 0 and "its next 5 segments recalibrate it" in done.stdout, done.stderr

    after = add(project, config, range(610, 614), ending=at + dt.timedelta(seconds=10))
    code, out = detect_json(project)
    assert code == 0 and {r["status"] for r in out["rows"]} == {"CALIBRATING"} and not out["machines"]
    add(project, config, [614], ending=at + dt.timedelta(seconds=50))
    result = cli(project, "detect", str(project / "out"))
    assert result.returncode == 0 and "recalibrated after maintenance: mix" in result.stdout, result.stdout

    detector = load_detector(project / "detector.pt")
    assert isinstance(detector, RecalibratedDetector) and set(detector.replaced) == {"mix"}
    assert list(project.glob("detector.pt.*.bak")), "the previous detector is kept"
    tensors = list_segments(project / "out")[-1].load_tensors()[0]
    t = tensors[(0, "mix")][None]
    assert detector.score("mix", t)[0] != before.score("mix", t)[0]  # a new model for the machine
    with Store(project / "out" / "signalcraft.sqlite") as store:
        (m,) = store.maintenance()
        assert m["recalibrated_utc"] is not None and m["note"] == "bearing replaced"
        first_fit, *_, refit = store.threshold_changes(0, "mix")
        assert refit["at_utc"] >= m["recalibrated_utc"][:19] and refit["warning"] != first_fit["warning"]
        assert len(store.recalibration_folders("mix", at.isoformat())) == 5 == len(after) + 1

    add(project, config, [615], ending=at + dt.timedelta(seconds=60))  # scored again, with the new model and levels
    code, out = detect_json(project)
    assert code == 0 and [r["status"] for r in out["rows"]] == ["NORMAL", "NORMAL"]


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=5000"]


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("chromium is not installed: run `bash scripts/setup.sh --test`")
    return subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**os.environ, "HOME": str(profile)})


def test_the_report_page_renders_its_table_and_images_in_chromium(copy, tmp_path):
    project, config = copy
    add(project, config, range(760, 763), "bearing")
    cli(project, "detect", str(project / "out"))
    cli(project, "ack", "mix", "-o", str(project / "out"), "-m", "<b>fitter</b> booked")  # markup in a note
    cli(project, "maintenance", "mix", "-m", "bearing replaced", "-o", str(project / "out"))

    report = cli(project, "report", str(project / "out"), "--out", str(tmp_path / "r"))
    assert report.returncode == 0, report.stderr
    assert "mix: CRITICAL (acknowledged) since" in report.stdout
    page = tmp_path / "r" / "index.html"
    assert report.stdout.splitlines()[-1] == f"report: {page}"
    html = page.read_text()
    assert "&lt;b&gt;fitter&lt;/b&gt; booked" in html and "<b>fitter</b>" not in html

    dom = chromium(tmp_path / "profile", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="machines"' in dom.stdout and '<td class="CRITICAL">CRITICAL</td>' in dom.stdout
    # Set by the page once loaded: every image decoded (a missing one would be replaced by a note).
    assert 'data-images-total="2"' in dom.stdout and 'data-images-loaded="2"' in dom.stdout, dom.stdout[-3000:]
    assert "<p class=\"missing\">" not in dom.stdout

    shot = tmp_path / "shot.png"
    taken = chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri())
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    import matplotlib.image

    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(int)
    assert pixels.shape[:2] == (1400, 1200)
    critical_cell = np.all(pixels == (0xff, 0xb3, 0xb3), axis=-1).sum()  # td.CRITICAL's background
    assert critical_cell > 500, "the table's CRITICAL cell is not on the screenshot"
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 1000, f"{colours} colours: the plots did not render"  # magma images, lines, text


def test_report_since_keeps_to_the_window(copy, tmp_path):
    project, config = copy
    newest = list_segments(project / "out")[-1]
    window = (newest.start_time + dt.timedelta(seconds=1)).isoformat()
    report = cli(project, "report", str(project / "out"), "--out", str(tmp_path / "r"), "--since", window)
    assert report.returncode == 0, report.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["machines"] == [] and summary["since_utc"] == window
    assert "the detector is still calibrating" in (tmp_path / "r" / "index.html").read_text()
