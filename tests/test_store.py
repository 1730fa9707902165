import datetime as dt
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from signalcraft import clock
from signalcraft.config import DetectConfig
from signalcraft.detect.store import SCHEMA_VERSION, Store, StoreError
from signalcraft.detect.thresholds import ThresholdState, fit
from signalcraft.errors import SignalcraftError

_START = clock.now() - dt.timedelta(minutes=5)
T0, T1, T2 = ((_START + dt.timedelta(seconds=10 * k)).isoformat() for k in range(3))
NOW = clock.now_iso()


@pytest.fixture
def path(tmp_path):
    return tmp_path / "output" / "signalcraft.sqlite"


def add_segment(store: Store, folder: str, start: str, phase: str = "scored", scores=((0, "pump", 0.1),),
                status: str = "NORMAL", corrupt: int = 0) -> int:
    with store.transaction():
        seg = store.record_segment(folder, start, NOW, len(scores), corrupt, phase)
        for mic, source, score in scores:
            store.add_score(seg, mic, source, score, 1.0, 2.0, status)
    return seg


def test_segments_and_scores_round_trip(path):
    with Store(path) as store:
        assert store.scored_folders() == set() and "a" not in store.scored_folders()
        # Recorded out of order: results come back in start-time order.
        add_segment(store, "c", T2, scores=((0, "pump", 0.3), (1, "fan", 0.4)), corrupt=1)
        add_segment(store, "a", T0, phase="calibration", scores=((0, "pump", None), (1, "fan", None)))
        add_segment(store, "b", T1, phase="calibration", scores=((0, "pump", 0.2),), status="CALIBRATING")
        assert store.scored_folders() == {"a", "b", "c"} and "b" in store.scored_folders()
        assert (store.phase("a"), store.phase("c"), store.phase("zzz")) == ("calibration", "scored", None)

        rows = store.scores()
        assert [(r["folder"], r["mic"], r["source"], r["score"]) for r in rows] == [
            ("a", 0, "pump", None), ("a", 1, "fan", None), ("b", 0, "pump", 0.2), ("c", 0, "pump", 0.3),
            ("c", 1, "fan", 0.4)]
        assert rows[-1] == {"segment_id": rows[-1]["segment_id"], "folder": "c", "start_time_utc": T2,
                            "phase": "scored", "mic": 1, "source": "fan", "score": 0.4, "warning": 1.0,
                            "critical": 2.0, "status": "NORMAL", "acknowledged": 0}
        assert [r["folder"] for r in store.scores(mic=0, source="pump", since_utc=T1)] == ["b", "c"]
        assert [r["folder"] for r in store.scores(source="fan")] == ["a", "c"]

        assert store.calibration_count() == 2
        assert store.calibration_count(0, "pump") == 2 and store.calibration_count(1, "fan") == 1
        calibration = [r["score"] for r in store.scores(mic=0, source="pump")
                       if r["phase"] == "calibration" and r["score"] is not None]
        np.testing.assert_array_equal(calibration, [0.2])
        assert store.counts() == {"segments": 3, "calibration_segments": 2, "scores": 3, "alerts": 0,
                                  "critical_alerts": 0, "corrupt_files": 1, "threshold_changes": 0,
                                  "rejected_segments": 0}


def test_alerts_round_trip(path):
    with Store(path) as store:
        s1 = add_segment(store, "a", T0, scores=((0, "pump", 3.0),), status="WARNING")
        s2 = add_segment(store, "b", T1, scores=((0, "pump", 3.5),), status="CRITICAL")
        store.add_alert(s1, 0, "pump", "WARNING", 3.0, T0)
        store.add_alert(s2, 0, "pump", "CRITICAL", 3.5, T1)
        alerts = store.alerts()
        assert [(a["folder"], a["status"], a["score"], a["at_utc"]) for a in alerts] == [
            ("a", "WARNING", 3.0, T0), ("b", "CRITICAL", 3.5, T1)]
        assert [a["folder"] for a in store.alerts(since_utc=T1)] == ["b"]
        assert store.counts()["alerts"] == 2 and store.counts()["critical_alerts"] == 1
        with pytest.raises(ValueError, match="NORMAL"):
            store.add_alert(s1, 0, "pump", "NORMAL", 0.1, T0)


def test_thresholds_current_state_and_history(path):
    state = fit(np.random.default_rng(0).gamma(4.0, 0.05, 60), DetectConfig())
    with Store(path) as store:
        assert store.get_threshold(0, "pump") is None
        store.set_threshold(0, "pump", state.to_dict(), "fitted on 60 calibration scores", T0)
        assert ThresholdState.from_dict(store.get_threshold(0, "pump")) == state

        moved = ThresholdState(**{**state.to_dict(), "warning": state.warning * 1.2, "recent": (True,)})
        store.set_threshold(0, "pump", moved.to_dict(), "drift: warning up", T1)
        store.set_threshold(1, "fan", state.to_dict(), "fitted", T1)
        # Saved after every segment for its alert flags, without a history entry.
        quiet = ThresholdState(**{**moved.to_dict(), "recent": (True, False)})
        store.set_threshold(0, "pump", quiet.to_dict(), "", T2, log_change=False)

        assert ThresholdState.from_dict(store.get_threshold(0, "pump")) == quiet
        changes = store.threshold_changes(0, "pump")
        assert [(c["at_utc"], c["reason"]) for c in changes] == [(T0, "fitted on 60 calibration scores"),
                                                                 (T1, "drift: warning up")]
        assert changes[1]["warning"] == pytest.approx(state.warning * 1.2)
        assert changes[1]["critical"] == pytest.approx(state.critical)
        assert ThresholdState.from_dict(changes[1]["state"]) == moved
        assert len(store.threshold_changes()) == 3 and len(store.threshold_changes(source="fan")) == 1


def test_an_error_inside_a_transaction_leaves_no_trace_of_the_segment(path):
    with Store(path) as store:
        with pytest.raises(ValueError, match="status"):
            with store.transaction():
                seg = store.record_segment("a", T0, NOW, 2, 0, "scored")
                store.add_score(seg, 0, "pump", 0.1, 1.0, 2.0, "NORMAL")
                store.set_threshold(0, "pump", {"warning": 1.0, "critical": 2.0}, "moved", T0)
                store.add_score(seg, 1, "fan", 0.2, 1.0, 2.0, "BROKEN")
        assert "a" not in store.scored_folders() and store.scores() == []
        assert store.get_threshold(0, "pump") is None and store.threshold_changes() == []
        assert store.counts()["segments"] == 0
        add_segment(store, "a", T0)  # the segment is scored again on the next run
        assert "a" in store.scored_folders()


def test_a_crash_mid_segment_leaves_it_absent(path):
    script = textwrap.dedent(f"""
        import os
        from signalcraft.detect.store import Store
        store = Store({str(path)!r})
        with store.transaction():
            seg = store.record_segment("a", {T0!r}, {NOW!r}, 2, 0, "scored")
            store.add_score(seg, 0, "pump", 0.1, 1.0, 2.0, "NORMAL")
            os._exit(3)  # killed before the second score and the commit
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == 3
    with Store(path) as store:
        assert "a" not in store.scored_folders() and store.scores() == []


def test_state_survives_reopening(path):
    with Store(path) as store:
        seg = add_segment(store, "a", T0, scores=((0, "pump", 3.0),), status="WARNING")
        store.add_alert(seg, 0, "pump", "WARNING", 3.0, T0)
        store.set_threshold(0, "pump", {"warning": 1.0, "critical": 2.0}, "fitted", T0)
        store.mark_calibration_done(T0)
    with Store(path) as store:
        assert store.scored_folders() == {"a"}
        assert store.scores()[0]["score"] == 3.0 and len(store.alerts()) == 1
        assert store.get_threshold(0, "pump") == {"warning": 1.0, "critical": 2.0}
        assert store.calibration_done() == T0


def test_two_stores_on_one_file_see_each_others_commits(path):
    with Store(path) as a, Store(path, timeout_s=0.1) as b:
        add_segment(a, "a", T0)
        assert "a" in b.scored_folders()
        add_segment(b, "b", T1)
        assert a.scored_folders() == {"a", "b"}
        with a.transaction():
            a.record_segment("c", T2, NOW, 1, 0, "scored")
            assert "c" not in b.scored_folders()  # a reader sees only committed segments ...
            with pytest.raises(StoreError, match="another signalcraft process"):
                with b.transaction():  # ... and a second writer waits, then gives up clearly
                    pass
        assert "c" in b.scored_folders()


def test_a_segment_is_recorded_once(path):
    with Store(path) as store:
        add_segment(store, "a", T0)
        with pytest.raises(StoreError, match="segment a is already recorded"):
            store.record_segment("a", T0, NOW, 1, 0, "scored")
        with pytest.raises(ValueError, match="phase"):
            store.record_segment("b", T0, NOW, 1, 0, "training")


def test_a_corrupt_file_names_itself_and_says_what_to_do(path):
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database, just some bytes of a damaged file" * 100)
    with pytest.raises(StoreError) as e:
        Store(path)
    assert isinstance(e.value, SignalcraftError)
    assert str(path) in str(e.value) and "Move it aside" in str(e.value)


def test_a_database_of_another_program_is_refused(path):
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
    db.close()
    with pytest.raises(StoreError, match="another program.*invoices"):
        Store(path)


def test_a_newer_schema_is_refused(path):
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.close()
    with pytest.raises(StoreError, match=f"newer signalcraft.*version {SCHEMA_VERSION + 1}.*Upgrade"):
        Store(path)


def test_an_older_state_file_is_upgraded_in_place_and_keeps_its_data(path):
    with Store(path) as store:
        add_segment(store, "a", T0, phase="calibration", scores=((0, "pump", None),), status="CALIBRATING")
    with sqlite3.connect(path) as db:  # as signalcraft with schema version 1 left it
        db.execute("DROP TABLE rejected")
        db.execute("DROP TABLE scorer_states")
        db.execute("DROP TABLE band_levels")
        db.execute("ALTER TABLE alerts DROP COLUMN ack_id")
        for table in ("acks", "labels", "maintenance"):
            db.execute(f"DROP TABLE {table}")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.close()
    with Store(path) as store:
        assert store.calibration_count() == 1 and store.rejected_folders() == {}
        store.set_scorer_state(0, "pump", {"counter": 3}, NOW)
        assert store.get_scorer_state(0, "pump") == {"counter": 3}
        store.add_maintenance("pump", NOW, "bearing replaced")
        assert [m["note"] for m in store.maintenance(pending=True)] == ["bearing replaced"]
        store.set_band_levels([{"mic": 0, "source": "pump", "db": [-20.0, -30.0]}], NOW)
        assert store.band_levels() == [{"mic": 0, "source": "pump", "db": [-20.0, -30.0]}]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    db.close()
