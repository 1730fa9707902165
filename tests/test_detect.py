"""`detect` end to end: simulated segments through the real chain, cold start,
calibration, scoring, alerts, incremental runs, bad input and exit codes."""

import datetime as dt
import json

import numpy as np
import soundfile as sf
import yaml

from signalcraft import clock
from signalcraft.config import config_from_dict
from signalcraft.detect.run import CALIBRATING, detect
from signalcraft.detect.store import Store
from signalcraft.errors import ExitCode
from signalcraft.record import process_files
from signalcraft.segments import MANIFEST, list_segments

from conftest import CALIBRATION, DEFAULT_ALERTS, SETTINGS, invoke, scene_file

def test_cold_start_calibrates_then_trains(calibrated):
    root, config, first, second = calibrated
    assert first.calibration == (CALIBRATION - 2, CALIBRATION) and not first.trained
    assert {r.status for r in first.rows} == {CALIBRATING}
    assert second.trained and second.calibration == (0, 0)
    assert config.detect.model.exists()
    with Store(root / "out" / "signalcraft.sqlite") as store:
        for mic in (0, 1):
            state = store.get_threshold(mic, "mix")
            assert state is not None and 0 < state["warning"] < state["critical"]
        assert "fit: gamma on" in store.threshold_changes()[0]["reason"]


def test_normal_segments_stay_normal_and_a_fault_ends_critical(copy):
    root, config = copy
    process_files(config, [scene_file(root, seed) for seed in range(100, 104)])
    normal = detect(config, root / "out")
    assert normal.segments == 4 and {r.status for r in normal.rows} == {"NORMAL"}

    process_files(config, [scene_file(root, seed, "bearing") for seed in range(200, 204)])
    faulty = detect(config, root / "out")
    by_segment: dict[str, set] = {}
    for r in faulty.rows:
        by_segment.setdefault(r.folder, set()).add(r.status)
    statuses = [by_segment[f] for f in sorted(by_segment)]
    assert all(s & {"WARNING", "CRITICAL"} for s in statuses)  # every fault segment is flagged
    assert "CRITICAL" in statuses[-1]  # ... and CRITICAL once k of n agree
    assert "CRITICAL" not in statuses[0]  # never on the first one alone
    with Store(root / "out" / "signalcraft.sqlite") as store:
        assert store.counts()["critical_alerts"] >= 1


def test_detect_on_a_folder_without_segments_says_so_every_run_and_leaves_no_state(tmp_path):
    settings = {**SETTINGS, "output": {"dir": str(tmp_path / "out"), "keep_days": None}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    wrong = tmp_path / "scene"  # say, a simulate folder typed for the output folder
    wrong.mkdir()
    for _ in range(2):
        result = invoke("--config", str(tmp_path / "config.yaml"), "-q", "detect", str(wrong))
        assert result.returncode == 0
        assert f"{wrong}: no segment folders" in result.stderr and "output.dir" in result.stderr
    assert not (wrong / "signalcraft.sqlite").exists()


def test_a_rejected_folder_is_reported_once_by_the_run_that_trains(tmp_path):
    settings = {**SETTINGS, "detect": {**SETTINGS["detect"], "calibration_segments": 5}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    config = config_from_dict(settings, tmp_path / "config.yaml")
    made, _ = process_files(config, [scene_file(tmp_path, seed) for seed in range(6)])
    (made[2] / MANIFEST).write_text("{")  # damaged: the other five calibrate
    result = invoke("--config", str(tmp_path / "config.yaml"), "detect", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "WARNING above" in result.stderr  # it trained
    assert result.stderr.count("manifest.json: not valid JSON") == 1, result.stderr


def test_a_second_run_scores_nothing_twice(copy):
    root, config = copy
    with Store(root / "out" / "signalcraft.sqlite") as store:
        before = store.counts()
    again = detect(config, root / "out")
    assert again.segments == 0 and again.rows == []
    with Store(root / "out" / "signalcraft.sqlite") as store:
        assert store.counts() == before


def test_corrupt_tensors_are_skipped_and_counted_and_incomplete_segments_wait(copy):
    root, config = copy
    made, _ = process_files(config, [scene_file(root, 300), scene_file(root, 301)])
    (made[0] / "mic_1" / "mix.pt").write_bytes(b"not a tensor")
    manifest = made[1] / MANIFEST
    held = manifest.read_text()
    manifest.unlink()  # as if still being written
    result = detect(config, root / "out")
    assert result.segments == 1 and result.corrupt == 1
    assert [(r.mic, r.source) for r in result.rows] == [(0, "mix")]
    manifest.write_text(held)
    later = detect(config, root / "out")
    assert later.segments == 1 and len(later.rows) == 2


def test_exit_codes_and_output_formats(copy):
    project, config = copy
    cfg = str(project / "config.yaml")
    assert invoke("--config", cfg, "detect", str(project / "out")).returncode == ExitCode.OK

    process_files(config, [scene_file(project, s, "bearing") for s in range(400, 404)])
    result = invoke("--config", cfg, "detect", str(project / "out"), "--json")
    assert result.returncode == ExitCode.CRITICAL == 4
    data = json.loads(result.stdout)
    assert data["segments"] == 4 and any(r["status"] == "CRITICAL" for r in data["rows"])

    first = list_segments(project / "out")[0].start_time.isoformat()
    csv_out = invoke("--config", cfg, "detect", str(project / "out"), "--csv", "--since", first)
    assert csv_out.returncode == ExitCode.OK  # nothing new
    assert csv_out.stdout.splitlines()[0] == "folder,start_time,mic,source,score,warning,critical,status"
    assert len(csv_out.stdout.splitlines()) > 10

    assert invoke("--config", cfg, "detect", str(project / "out"), "--json", "--csv").returncode == ExitCode.USAGE
    (project / "detector.pt").write_bytes(b"garbage")
    process_files(config, [scene_file(project, 500)])
    broken = invoke("--config", cfg, "detect", str(project / "out"))
    assert broken.returncode == ExitCode.FAILURE and "detector.pt" in broken.stderr


def test_quiet_detect_prints_only_the_anomalies(copy):
    """What cron mails: nothing while all is normal, the flagged rows when not."""
    project, config = copy
    cfg, out = str(project / "config.yaml"), str(project / "out")
    process_files(config, [scene_file(project, seed) for seed in range(700, 702)])
    quiet = invoke("-q", "--config", cfg, "detect", out)
    assert (quiet.returncode, quiet.stdout) == (ExitCode.OK, ""), quiet.stdout + quiet.stderr
    process_files(config, [scene_file(project, seed, "bearing") for seed in range(710, 714)])
    quiet = invoke("-q", "--config", cfg, "detect", out)
    assert quiet.returncode == ExitCode.CRITICAL, quiet.stderr
    # One row per machine says which one to go and check, since when and where.
    lines = quiet.stdout.splitlines()
    assert lines[0].split()[:3] == ["machine", "status", "since"] and not any(line.startswith("20") for line in lines)
    machine = next(line.split() for line in lines if line.startswith("mix "))
    segments = list_segments(project / "out")
    first_fault = segments[-4]
    assert machine[1] == "CRITICAL" and machine[3] == segments[-1].name and float(machine[5]) > 1
    assert set(machine[4].split(",")) <= {"0", "1"} and machine[4]
    assert dt.datetime.fromisoformat(machine[2]) >= first_fault.start_time.replace(tzinfo=None, microsecond=0)
    # The log names it too.
    assert "mix CRITICAL since" in (project / "logs" / "signalcraft.log").read_text()
    # -v adds the (segment, microphone, machine) rows.
    verbose = invoke("-v", "--config", cfg, "detect", out, "--since", first_fault.start_time.isoformat())
    statuses = {line.split()[-1] for line in verbose.stdout.splitlines() if line.startswith("20")}
    assert "CRITICAL" in statuses, (verbose.returncode, verbose.stdout, verbose.stderr[-2000:])


def test_warning_exit_code(copy):
    """One abnormal segment after normal ones: WARNING, not yet CRITICAL (k of n)."""
    project, config = copy
    # Normal segments first, so no earlier fault is among the last alert_n segments.
    process_files(config, [scene_file(project, seed) for seed in range(610, 615)])
    assert invoke("--config", str(project / "config.yaml"), "detect", str(project / "out")).returncode == 0
    process_files(config, [scene_file(project, 600, "bearing")])
    result = invoke("--config", str(project / "config.yaml"), "detect", str(project / "out"))
    assert result.returncode == ExitCode.WARNING == 3, result.stdout + result.stderr
    assert "WARNING" in result.stdout


def test_by_default_a_lone_segment_above_the_warning_level_is_no_alert_three_of_five_are(copy):
    project, _ = copy
    settings = DEFAULT_ALERTS
    (project / "config.yaml").write_text(yaml.safe_dump(settings))
    config = config_from_dict(settings, project / "config.yaml")
    assert (config.detect.alerts.warning_k, config.detect.alerts.warning_n) == (3, 5)
    cfg, out = str(project / "config.yaml"), str(project / "out")
    process_files(config, [scene_file(project, seed) for seed in range(620, 625)])
    assert invoke("--config", cfg, "detect", out).returncode == 0
    process_files(config, [scene_file(project, 620, "bearing")])
    lone = detect(config, project / "out")
    assert lone.rows and all(r.score > r.warning and r.status == "NORMAL" for r in lone.rows), lone.rows
    assert lone.anomalies == 0
    process_files(config, [scene_file(project, seed, "bearing") for seed in (621, 622)])
    result = invoke("--config", cfg, "detect", out, "--csv")
    assert result.returncode in (ExitCode.WARNING, ExitCode.CRITICAL), result.stdout + result.stderr
    third = [line.split(",") for line in result.stdout.splitlines()[1:]][-2:]  # the last segment's two rows
    assert {row[-1] for row in third} <= {"WARNING", "CRITICAL"} and len(third) == 2, result.stdout


def test_report_writes_a_page_its_images_and_a_summary(copy, tmp_path):
    root, config = copy
    process_files(config, [scene_file(root, seed) for seed in (610, 611)])
    detect(config, root / "out")
    result = invoke("--config", str(root / "config.yaml"), "report", str(root / "out"), "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["images", "index.html", "summary.json"]
    images = sorted((tmp_path / "r" / "images").iterdir())
    assert [p.name for p in images] == ["00_mix_mels.png", "00_mix_timeline.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in images)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert [m["source"] for m in summary["machines"]] == ["mix"]
    assert 'src="images/00_mix_timeline.png"' in (tmp_path / "r" / "index.html").read_text()
    assert len(result.stdout.splitlines()) < 25  # fits one screen


def test_a_detector_without_its_thresholds_is_refused_not_silently_calibrating(copy):
    project, _ = copy
    (project / "out" / "signalcraft.sqlite").unlink()  # a new state file beside a trained detector
    result = invoke("--config", str(project / "config.yaml"), "detect", str(project / "out"))
    assert result.returncode == ExitCode.FAILURE
    assert "holds no thresholds for it" in result.stderr and "train-detector" in result.stderr


def test_train_detector_takes_a_period_and_keeps_the_old_detector_on_failure(copy):
    project, _ = copy
    cfg, out = str(project / "config.yaml"), str(project / "out")
    before = (project / "detector.pt").read_bytes()
    starts = [s.start_time.isoformat() for s in list_segments(project / "out")]

    nothing = invoke("--config", cfg, "train-detector", out, "--until", starts[0])
    assert nothing.returncode == ExitCode.FAILURE and "0 segment(s) to train on" in nothing.stderr
    assert (project / "detector.pt").read_bytes() == before
    bad = invoke("--config", cfg, "train-detector", out, "--since", "yesterday")
    assert bad.returncode == ExitCode.USAGE and "--since 'yesterday': not an ISO 8601 time" in bad.stderr

    # The first ten segments only, thinned to eight; given in local time with an offset.
    until = dt.datetime.fromisoformat(starts[10]).astimezone()
    result = invoke("--config", cfg, "train-detector", out, "--until", until.isoformat(), "--max-segments", "8")
    assert result.returncode == 0, result.stderr
    assert "training on 8 of 10 segments" in result.stderr
    assert (project / "detector.pt").read_bytes() != before
    backup, = project.glob("detector.pt.*.bak")  # the previous detector, kept as calibrate-noise keeps clips
    assert backup.read_bytes() == before and backup.name in result.stderr
    with Store(project / "out" / "signalcraft.sqlite") as store:
        assert len(store.threshold_changes()) > 2


def test_a_stream_with_too_few_readable_calibration_tensors_does_not_hold_the_others_back(copy):
    """One damaged tensor among the fewest calibration segments allowed: that stream is
    left unscored and named, the others get their thresholds and are scored."""
    project, config = copy
    cfg, out = str(project / "config.yaml"), str(project / "out")
    segments = list_segments(project / "out")
    (segments[0].path / "mic_1" / "mix.pt").write_bytes(b"damaged")
    result = invoke("--config", cfg, "train-detector", out, "--until", segments[5].start_time.isoformat())
    assert result.returncode == 0, result.stderr
    assert "mic_1/mix: only 4 of its calibration tensors could be scored" in result.stderr
    with Store(project / "out" / "signalcraft.sqlite") as store:
        assert store.get_threshold(0, "mix") is not None and store.get_threshold(1, "mix") is None
    process_files(config, [scene_file(project, 400)])
    scored = detect(config, project / "out")
    assert [(r.mic, r.status) for r in scored.rows] == [(0, "NORMAL")]


def test_a_damaged_calibration_tensor_is_reported_once_by_the_run_that_calibrates_and_trains(copy, caplog):
    project, config = copy
    (project / "out" / "signalcraft.sqlite").unlink()  # calibrate again from scratch, in one run
    (project / "detector.pt").unlink()
    damaged = list_segments(project / "out")[3].path / "mic_1" / "mix.pt"
    damaged.write_bytes(b"damaged")
    with caplog.at_level("DEBUG"):
        result = detect(config, project / "out")
    assert result.trained and result.corrupt == 1
    said = [r for r in caplog.records if str(damaged) in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING", "DEBUG"]  # when calibrated; training reads it quietly


def test_the_online_scorer_learns_each_normal_segment_and_never_a_flagged_one(copy):
    project, _ = copy
    # The default alert rule: a lone segment above the warning level is NORMAL, and is
    # not learnt either.
    settings = {**DEFAULT_ALERTS, "detect": {**DEFAULT_ALERTS["detect"], "scorer": {"kind": "online"}}}
    (project / "config.yaml").write_text(yaml.safe_dump(settings))
    config = config_from_dict(settings, project / "config.yaml")
    # On the calibration segments (other tests may have added faulty ones to the project).
    until = [s.start_time.isoformat() for s in list_segments(project / "out")][CALIBRATION - 1]
    trained = invoke("--config", str(project / "config.yaml"), "train-detector", str(project / "out"), "--until", until)
    assert trained.returncode == 0, trained.stderr
    state_file = project / "out" / "signalcraft.sqlite"

    hiss = project / "hiss.wav"  # nothing like the pump: loud broadband noise on both microphones
    sf.write(hiss, 0.3 * np.random.default_rng(0).standard_normal((160_000, 2)).astype(np.float32), 16000)
    outcomes = set()
    for seed, fault in ((300, None), (301, None), (302, "hiss"), (303, None)):
        with Store(state_file) as store:
            before = {mic: store.get_scorer_state(mic, "mix") for mic in (0, 1)}
        process_files(config, [hiss if fault else scene_file(project, seed)])
        rows = detect(config, project / "out").rows
        with Store(state_file) as store:
            for row in rows:
                learnt = store.get_scorer_state(row.mic, "mix") != before[row.mic]
                assert learnt == (row.status == "NORMAL" and row.score <= row.warning), (seed, row)
                outcomes.add((fault, row.status, row.score > row.warning, learnt))
    assert (None, "NORMAL", False, True) in outcomes and ("hiss", "NORMAL", True, False) in outcomes

    # A damaged stored model is logged and replaced by the calibration one; detect goes on.
    with Store(state_file) as store:
        with store.transaction():
            store.set_scorer_state(0, "mix", {"structure": "damaged"}, clock.now_iso())
    process_files(config, [scene_file(project, 306)])
    assert detect(config, project / "out").segments == 1
    with Store(state_file) as store:
        assert store.get_scorer_state(0, "mix") != {"structure": "damaged"}

    # A new detector starts again from its own calibration.
    again = invoke("--config", str(project / "config.yaml"), "train-detector", str(project / "out"), "--until", until)
    assert again.returncode == 0, again.stderr
    with Store(state_file) as store:
        assert store.get_scorer_state(0, "mix") is None
