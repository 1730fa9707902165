"""The state of `signalcraft detect` in one SQLite file (default
``<output>/signalcraft.sqlite``).

It holds the segments seen, every score with the levels it was judged against, the
current thresholds per (microphone, source) with the history of their changes, the
alerts, what operators said (acknowledgements of a machine's alarm, labels of segments:
a false alarm is normal, a confirmed fault an anomaly; maintenance), and the outbox of
messages for the plant's MQTT broker (``signalcraft.publish``), each queued in the
transaction of the result it describes.
Write one segment's records inside ``with store.transaction():``: a crash or an error
then leaves the segment wholly absent (and scored again on the next run), never
half-scored.

The file is in WAL mode, so ``signalcraft`` commands that only read (a status page, an
export) can run while cron's ``detect`` writes; a second writer waits up to
``BUSY_TIMEOUT_S`` for the first.

Times are ISO 8601 UTC strings, as the caller passes them; ``since_utc`` filters compare
them as text, so use one format throughout (``datetime.isoformat()`` of aware UTC
times).
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional


from .. import clock
from ..errors import StorageError

SCHEMA_VERSION = 6
BUSY_TIMEOUT_S = 30.0  # a writer waits this long for another process's transaction, s
PHASES = ("calibration", "scored")
STATUSES = ("NORMAL", "WARNING", "CRITICAL", "CALIBRATING")
ALERT_STATUSES = ("WARNING", "CRITICAL")
LABELS = ("normal", "anomaly")

# What operators say (schema version 4).
_OPERATOR_TABLES = f"""
CREATE TABLE IF NOT EXISTS acks (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,               -- the machine (asset)
    status TEXT NOT NULL CHECK (status IN {ALERT_STATUSES}),  -- its state when acknowledged
    folder TEXT NOT NULL,               -- its newest scored segment then
    start_time_utc TEXT NOT NULL,       -- that segment's start
    at_utc TEXT NOT NULL,
    note TEXT NOT NULL,
    ended_utc TEXT,                     -- when its machine's state changed, which ended it (NULL: in force)
    ended_folder TEXT                   -- the segment in which it changed
);
CREATE TABLE IF NOT EXISTS labels (
    folder TEXT PRIMARY KEY,            -- a segment folder, relative to the output folder
    label TEXT NOT NULL CHECK (label IN {LABELS}),
    at_utc TEXT NOT NULL,
    note TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS maintenance (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    at_utc TEXT NOT NULL,               -- segments starting from then are of the maintained machine
    note TEXT NOT NULL,
    recalibrated_utc TEXT               -- NULL until detect has recalibrated the machine on them
);
"""
# Messages for the plant's broker (schema version 5), sent oldest first.
_OUTBOX_TABLE = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,             -- the order of sending
    message_id TEXT NOT NULL UNIQUE,    -- stable for the event: a resent message is recognised
    topic TEXT NOT NULL,                -- after publish.mqtt.topic_prefix: <site>/<asset>/state, ...
    payload TEXT NOT NULL,              -- JSON
    retain INTEGER NOT NULL,
    created_utc TEXT NOT NULL,
    sent_utc TEXT                       -- when the broker acknowledged it (NULL: waiting)
);
CREATE INDEX IF NOT EXISTS outbox_waiting ON outbox (sent_utc, id)
"""
# Each stream's typical level per band in calibration, for attribution (schema version 6).
_BAND_LEVELS_TABLE = """
CREATE TABLE IF NOT EXISTS band_levels (
    mic INTEGER NOT NULL,
    source TEXT NOT NULL,
    levels_json TEXT NOT NULL,          -- dB per mel band (detect.attribution)
    updated_at_utc TEXT NOT NULL,
    PRIMARY KEY (mic, source)
)"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY,
    folder TEXT NOT NULL UNIQUE,        -- relative to the output folder
    start_time_utc TEXT NOT NULL,
    scored_at_utc TEXT NOT NULL,
    n_tensors INTEGER NOT NULL,
    n_corrupt INTEGER NOT NULL,
    phase TEXT NOT NULL CHECK (phase IN {PHASES})
);
CREATE INDEX IF NOT EXISTS segments_start ON segments (start_time_utc);
CREATE TABLE IF NOT EXISTS scores (
    segment_id INTEGER NOT NULL REFERENCES segments (id) ON DELETE CASCADE,
    mic INTEGER NOT NULL,
    source TEXT NOT NULL,
    score REAL,                         -- NULL: not scored (calibration)
    warning REAL,                       -- the levels the score was judged against
    critical REAL,
    status TEXT NOT NULL CHECK (status IN {STATUSES}),
    PRIMARY KEY (segment_id, mic, source)
);
CREATE INDEX IF NOT EXISTS scores_mic_source ON scores (mic, source);
CREATE TABLE IF NOT EXISTS thresholds (
    mic INTEGER NOT NULL,
    source TEXT NOT NULL,
    state_json TEXT NOT NULL,           -- ThresholdState.to_dict()
    updated_at_utc TEXT NOT NULL,
    PRIMARY KEY (mic, source)
);
CREATE TABLE IF NOT EXISTS threshold_changes (
    id INTEGER PRIMARY KEY,
    mic INTEGER NOT NULL,
    source TEXT NOT NULL,
    at_utc TEXT NOT NULL,
    reason TEXT NOT NULL,
    warning REAL,
    critical REAL,
    state_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    segment_id INTEGER NOT NULL REFERENCES segments (id) ON DELETE CASCADE,
    mic INTEGER NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN {ALERT_STATUSES}),
    score REAL NOT NULL,
    at_utc TEXT NOT NULL,
    ack_id INTEGER REFERENCES acks (id)  -- the acknowledgement that covers it, NULL while none does
);
CREATE INDEX IF NOT EXISTS alerts_at ON alerts (at_utc);
CREATE TABLE IF NOT EXISTS rejected (
    folder TEXT PRIMARY KEY,            -- relative to the output folder
    signature TEXT NOT NULL,            -- segments.manifest_signature when rejected: a changed file is read again
    seen_at_utc TEXT NOT NULL,
    reason TEXT NOT NULL                -- why it is not a usable segment (its manifest)
);
CREATE TABLE IF NOT EXISTS scorer_states (
    mic INTEGER NOT NULL,
    source TEXT NOT NULL,
    state_json TEXT NOT NULL,           -- a scorer that learns online (detect.scorer.kind online): its model
    updated_at_utc TEXT NOT NULL,
    PRIMARY KEY (mic, source)
);
{_OPERATOR_TABLES};
{_OUTBOX_TABLE};
{_BAND_LEVELS_TABLE}
"""
# Statements that bring a state file of version k (the key) to version k + 1.
_MIGRATIONS = {
    1: """CREATE TABLE rejected (folder TEXT PRIMARY KEY, signature TEXT NOT NULL, seen_at_utc TEXT NOT NULL,
                                 reason TEXT NOT NULL)""",
    2: """CREATE TABLE scorer_states (mic INTEGER NOT NULL, source TEXT NOT NULL, state_json TEXT NOT NULL,
                                      updated_at_utc TEXT NOT NULL, PRIMARY KEY (mic, source))""",
    3: _OPERATOR_TABLES + ";ALTER TABLE alerts ADD COLUMN ack_id INTEGER REFERENCES acks (id)",
    4: _OUTBOX_TABLE,
    5: _BAND_LEVELS_TABLE,
}


class StoreError(StorageError):
    """The state file is unreadable, not signalcraft's, too new, or locked."""


class Store:
    """The state database; a context manager that closes it.

    Parameters
    ----------
    path : Path
        The SQLite file; with ``create`` it and its folder are created if missing.
    timeout_s : float
        How long to wait for another process's write transaction, s.
    create : bool
        False for readers (reports): a missing file is an error, not a new empty state.

    Raises
    ------
    StoreError
        The file is missing (``create`` False), is not a SQLite database, belongs to
        another program, was written by a newer signalcraft, or cannot be opened.
    """

    def __init__(self, path: Path, timeout_s: float = BUSY_TIMEOUT_S, create: bool = True):
        self.path = Path(path)
        self._depth = 0  # nesting of transaction()
        if not create and not self.path.is_file():
            raise StoreError(f"{self.path}: no detection state yet. Run `signalcraft detect` on the output "
                             "folder first (or set detect.state to where its state file is).")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create the state file's folder: {e.strerror}.") from None
        try:
            # isolation_level=None: no implicit transactions; transaction() issues BEGIN.
            self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
        except sqlite3.Error as e:
            raise self._error(e) from None
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA foreign_keys = ON")
            # WAL: readers never block the writer. synchronous=NORMAL: a power cut may
            # lose the last commits, never corrupt the file; detect then re-scores.
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._open_schema()
        except BaseException as e:
            self._db.close()
            if isinstance(e, sqlite3.Error):
                raise self._error(e) from None
            raise

    def _open_schema(self) -> None:
        with self.transaction():
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "meta" not in tables:
                raise StoreError(
                    f"{self.path}: a SQLite file of another program (tables: {', '.join(sorted(tables))}). "
                    "Point detect.state at another file, or move this one aside."
                )
            version = None
            if "meta" in tables:
                row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                version = int(row[0]) if row is not None else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: state written by a newer signalcraft (schema version {version}, this "
                    f"one reads up to {SCHEMA_VERSION}). Upgrade signalcraft, or point detect.state at "
                    "another file."
                )
            if version is None:
                # Statement by statement: executescript() would commit the open transaction.
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif version < SCHEMA_VERSION:
                for k in range(version, SCHEMA_VERSION):
                    for statement in filter(str.strip, _MIGRATIONS[k].split(";")):
                        self._db.execute(statement)
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        """Close the file; a transaction still open is rolled back."""
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator["Store"]:
        """All writes inside are committed together at the end, or none on an exception.

        Nested blocks join the outermost one. The write lock is taken at the start
        (``BEGIN IMMEDIATE``), so waiting for another writer happens here, not halfway.

        Raises
        ------
        StoreError
            Another process held the file longer than the timeout, the disk is full, or
            the file is damaged.
        """
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise self._error(e) from None
        self._depth = 1
        try:
            yield self
        except BaseException:
            self._depth = 0
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        self._depth = 0
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise self._error(e) from None

    def _execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.IntegrityError:
            raise  # a caller's mistake (a segment recorded twice); handled where it can happen
        except sqlite3.Error as e:
            raise self._error(e) from None

    def _error(self, e: sqlite3.Error) -> StoreError:
        message = str(e)
        if "locked" in message or "busy" in message:
            hint = ("another signalcraft process is writing it; wait for it to finish (is a second "
                    "`detect` running from cron?)")
        elif "full" in message:
            hint = "the disk is full: free space, then run again"
        elif isinstance(e, sqlite3.DatabaseError) and ("not a database" in message or "malformed" in message):
            hint = ("the file is damaged or not a signalcraft state file. Move it aside (keep it for "
                    "inspection); the next `signalcraft detect` starts a new state file")
        elif "unable to open" in message or "readonly" in message:
            hint = "cannot open it for writing: detect.state must name a file in a writable folder"
        else:
            return StoreError(f"{self.path}: state database: {message}.")
        return StoreError(f"{self.path}: state database: {hint} ({message}).")

    # Segments

    def scored_folders(self, among: Optional[Iterable[str]] = None) -> set[str]:
        """Every recorded segment folder; with ``among``, only those of these names (what
        a run needs: the folders on disk, not months of history)."""
        if among is None:
            return {r[0] for r in self._execute("SELECT folder FROM segments")}
        names, found = list(among), set()
        for k in range(0, len(names), 500):  # SQLite limits the parameters of one statement
            chunk = names[k:k + 500]
            marks = ",".join("?" * len(chunk))
            found |= {r[0] for r in self._execute(f"SELECT folder FROM segments WHERE folder IN ({marks})",
                                                  tuple(chunk))}
        return found

    def rejected_folders(self) -> dict[str, str]:
        """Folders that looked like segments but were refused (bad manifest): name ->
        the signature of the manifest that was refused."""
        return {r[0]: r[1] for r in self._execute("SELECT folder, signature FROM rejected")}

    def reject(self, folder: str, signature: str, reason: str, at_utc: str) -> None:
        """Record that ``folder``, with its manifest as ``signature`` says, is not a
        usable segment, so that later runs pass it by until the file changes."""
        self._execute("INSERT OR REPLACE INTO rejected (folder, signature, seen_at_utc, reason) VALUES (?, ?, ?, ?)",
                      (folder, signature, at_utc, reason))

    def finished_folders(self) -> set[str]:
        """Segments detect has finished with: scored ones, and calibration ones once the
        detector is trained. Retention may delete only these."""
        phases = ("scored", "calibration") if self.calibration_done() else ("scored",)
        marks = ",".join("?" * len(phases))
        return {r[0] for r in self._execute(f"SELECT folder FROM segments WHERE phase IN ({marks})", phases)}

    def evidence_folders(self) -> set[str]:
        """Finished segments that retention keeps all the same: those with alerts no
        acknowledgement covers and no label answers (the evidence of an alarm), and those
        collected to recalibrate a machine after its maintenance, until it is."""
        kept = self.unacknowledged_alert_folders()
        for m in self.maintenance(pending=True):
            kept |= set(self.recalibration_folders(m["source"], m["at_utc"]))
        return kept

    def phase(self, folder: str) -> Optional[str]:
        """'calibration' or 'scored' for a recorded segment, None for an unknown one."""
        row = self._execute("SELECT phase FROM segments WHERE folder = ?", (folder,)).fetchone()
        return None if row is None else row[0]

    def record_segment(self, folder: str, start_time_utc: str, scored_at: str, n_tensors: int, n_corrupt: int,
                       phase: str) -> int:
        """Record a segment; returns its id for its scores and alerts.

        Raises
        ------
        ValueError
            ``phase`` is not 'calibration' or 'scored'.
        StoreError
            The folder is already recorded.
        """
        if phase not in PHASES:
            raise ValueError(f"segment phase {phase!r}: must be one of {', '.join(PHASES)}")
        try:
            cursor = self._execute(
                "INSERT INTO segments (folder, start_time_utc, scored_at_utc, n_tensors, n_corrupt, phase) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (folder, start_time_utc, scored_at, int(n_tensors), int(n_corrupt), phase),
            )
        except sqlite3.IntegrityError:
            raise StoreError(f"{self.path}: segment {folder} is already recorded (did another detect run score it?).") from None
        return int(cursor.lastrowid)

    # Scores

    def add_score(self, segment_id: int, mic: int, source: str, score: Optional[float], warning: Optional[float],
                  critical: Optional[float], status: str) -> None:
        """Record one (mic, source) score of a segment, with the levels it was judged
        against. ``score`` None: a calibration segment, not scored.

        Raises
        ------
        ValueError
            ``status`` is unknown or ``score`` is not finite (SQLite would store NaN as NULL).
        """
        if status not in STATUSES:
            raise ValueError(f"score status {status!r}: must be one of {', '.join(STATUSES)}")
        if score is not None and not math.isfinite(score):
            raise ValueError(f"mic {mic} / {source}: score {score!r} is not finite")
        self._execute(
            "INSERT INTO scores (segment_id, mic, source, score, warning, critical, status) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (segment_id, int(mic), source, _float(score), _float(warning), _float(critical), status),
        )

    def scores(self, mic: Optional[int] = None, source: Optional[str] = None,
               since_utc: Optional[str] = None) -> list[dict[str, Any]]:
        """Scores with their segment's folder, start time and phase, oldest first.

        Each row: segment_id, folder, start_time_utc, phase, mic, source, score, warning,
        critical, status, acknowledged (1 for an alert an acknowledgement covers, else 0).
        """
        where, params = _filters(mic=mic, source=source, since=("s.start_time_utc", since_utc))
        rows = self._execute(
            "SELECT c.segment_id, s.folder, s.start_time_utc, s.phase, c.mic, c.source, c.score, c.warning, "
            "c.critical, c.status, a.ack_id IS NOT NULL AS acknowledged FROM scores c "
            "JOIN segments s ON s.id = c.segment_id LEFT JOIN alerts a ON a.segment_id = c.segment_id "
            f"AND a.mic = c.mic AND a.source = c.source {where} ORDER BY s.start_time_utc, s.id, c.mic, c.source",
            params,
        )
        return [dict(r) for r in rows]

    def calibration_count(self, mic: Optional[int] = None, source: Optional[str] = None) -> int:
        """Calibration segments recorded: all of them, or those with a tensor of (mic, source)."""
        if mic is None and source is None:
            return self._execute("SELECT COUNT(*) FROM segments WHERE phase = 'calibration'").fetchone()[0]
        where, params = _filters(mic=mic, source=source)
        return self._execute(
            "SELECT COUNT(*) FROM scores c JOIN segments s ON s.id = c.segment_id "
            f"{where} AND s.phase = 'calibration'",
            params,
        ).fetchone()[0]

    def sources(self) -> list[str]:
        """The machines (sources) with at least one score row, sorted."""
        return [r[0] for r in self._execute("SELECT DISTINCT source FROM scores ORDER BY source")]

    def newest_scored(self, source: str, before_segment: Optional[int] = None) -> Optional[dict[str, Any]]:
        """Machine ``source``'s newest scored segment (or the newest other than segment id
        ``before_segment``): id, folder, start_time_utc and status (the worst over its
        microphones); None when it has none."""
        where, params = ("AND s.id != ?", (before_segment,)) if before_segment is not None else ("", ())
        latest = self._execute(
            "SELECT s.id, s.folder, s.start_time_utc FROM segments s JOIN scores c ON c.segment_id = s.id "
            f"WHERE c.source = ? AND c.status IN ('NORMAL', 'WARNING', 'CRITICAL') {where} "
            "ORDER BY s.start_time_utc DESC, s.id DESC LIMIT 1", (source, *params)).fetchone()
        if latest is None:
            return None
        statuses = {r[0] for r in self._execute("SELECT status FROM scores WHERE segment_id = ? AND source = ?",
                                                (latest[0], source))}
        return {**dict(latest), "status": next(s for s in ("CRITICAL", "WARNING", "NORMAL") if s in statuses)}

    def state_since(self, source: str) -> Optional[str]:
        """The start of the first of machine ``source``'s newest run of scored segments in
        one state (the worst over its microphones): since when it is in its state now."""
        row = self._execute(
            "WITH per AS (SELECT s.start_time_utc AS t, MAX(CASE c.status WHEN 'CRITICAL' THEN 2 "
            "WHEN 'WARNING' THEN 1 ELSE 0 END) AS r FROM scores c JOIN segments s ON s.id = c.segment_id "
            "WHERE c.source = ? AND c.status IN ('NORMAL', 'WARNING', 'CRITICAL') GROUP BY s.id), "
            "newest AS (SELECT r FROM per ORDER BY t DESC LIMIT 1) "
            "SELECT MIN(t) FROM per WHERE t > COALESCE((SELECT MAX(t) FROM per WHERE r != (SELECT r FROM newest)), '')",
            (source,)).fetchone()
        return row[0] if row is not None else None

    def machine_state(self, source: str, before_segment: Optional[int] = None) -> Optional[str]:
        """The state of machine ``source`` in ``newest_scored``, or None."""
        newest = self.newest_scored(source, before_segment)
        return None if newest is None else newest["status"]

    def mark_calibration_done(self, at_utc: Optional[str] = None) -> None:
        """Record that calibration ended and the detector was trained (at ``at_utc``,
        default now)."""
        if at_utc is None:
            at_utc = clock.now_iso()
        self._execute("INSERT OR REPLACE INTO meta VALUES ('calibration_done_utc', ?)", (at_utc,))

    def calibration_done(self) -> Optional[str]:
        """When calibration ended (UTC), or None while it has not."""
        row = self._execute("SELECT value FROM meta WHERE key = 'calibration_done_utc'").fetchone()
        return None if row is None else row[0]

    # Thresholds

    def has_thresholds(self) -> bool:
        """True once thresholds were fitted for at least one (mic, source)."""
        return self._execute("SELECT 1 FROM thresholds LIMIT 1").fetchone() is not None

    def get_threshold(self, mic: int, source: str) -> Optional[dict[str, Any]]:
        """The current threshold state of (mic, source) as saved, or None."""
        row = self._execute("SELECT state_json FROM thresholds WHERE mic = ? AND source = ?",
                            (int(mic), source)).fetchone()
        return None if row is None else self._json(row[0])

    def set_threshold(self, mic: int, source: str, state: dict[str, Any], reason: str, at_utc: str,
                      log_change: bool = True) -> None:
        """Save the current threshold state of (mic, source) and, with ``log_change``,
        append it to the history with ``reason``. Saving the state after every segment
        (its recent alert flags change) with ``log_change=False`` keeps the history to
        real changes."""
        text = json.dumps(state, allow_nan=False, sort_keys=True)
        with self.transaction():
            self._execute(
                "INSERT INTO thresholds (mic, source, state_json, updated_at_utc) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (mic, source) DO UPDATE SET state_json = excluded.state_json, "
                "updated_at_utc = excluded.updated_at_utc",
                (int(mic), source, text, at_utc),
            )
            if log_change:
                self._execute(
                    "INSERT INTO threshold_changes (mic, source, at_utc, reason, warning, critical, state_json) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (int(mic), source, at_utc, reason, _float(state.get("warning")), _float(state.get("critical")),
                     text),
                )

    def drop_threshold(self, mic: int, source: str) -> None:
        """Forget the current thresholds of (mic, source) (a new detector could not fit
        them): it is not scored until they are fitted again. Their history stays."""
        self._execute("DELETE FROM thresholds WHERE mic = ? AND source = ?", (int(mic), source))

    def get_scorer_state(self, mic: int, source: str) -> Optional[dict[str, Any]]:
        """The model of (mic, source) of a scorer that learns online, as saved, or None."""
        row = self._execute("SELECT state_json FROM scorer_states WHERE mic = ? AND source = ?",
                            (int(mic), source)).fetchone()
        return None if row is None else self._json(row[0])

    def set_scorer_state(self, mic: int, source: str, state: dict[str, Any], at_utc: str) -> None:
        """Save the model of (mic, source) of a scorer that learns online."""
        self._execute(
            "INSERT INTO scorer_states (mic, source, state_json, updated_at_utc) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (mic, source) DO UPDATE SET state_json = excluded.state_json, "
            "updated_at_utc = excluded.updated_at_utc",
            (int(mic), source, json.dumps(state, allow_nan=False, sort_keys=True), at_utc),
        )

    def band_levels(self) -> list[dict[str, Any]]:
        """The saved band levels (``attribution.levels_to_data`` rows), unchecked;
        a row that is not JSON comes back as it is, for the reader to reject."""
        rows = []
        for mic, source, text in self._execute("SELECT mic, source, levels_json FROM band_levels ORDER BY mic, source"):
            try:
                db = json.loads(text)
            except ValueError:
                db = text
            rows.append({"mic": mic, "source": source, "db": db})
        return rows

    def set_band_levels(self, rows: Iterable[dict[str, Any]], at_utc: str, source: Optional[str] = None) -> None:
        """Replace the band levels (of ``source`` only, if given) by ``rows``."""
        if source is None:
            self._execute("DELETE FROM band_levels")
        else:
            self._execute("DELETE FROM band_levels WHERE source = ?", (source,))
        for row in rows:
            self._execute("INSERT INTO band_levels (mic, source, levels_json, updated_at_utc) VALUES (?, ?, ?, ?)",
                          (int(row["mic"]), row["source"], json.dumps(row["db"], allow_nan=False), at_utc))

    def clear_scorer_states(self, source: Optional[str] = None) -> None:
        """Forget every online model, or those of ``source`` (a new detector starts from
        its own calibration)."""
        if source is None:
            self._execute("DELETE FROM scorer_states")
        else:
            self._execute("DELETE FROM scorer_states WHERE source = ?", (source,))

    def threshold_changes(self, mic: Optional[int] = None, source: Optional[str] = None) -> list[dict[str, Any]]:
        """The history of threshold changes, oldest first. Each row: id, mic, source,
        at_utc, reason, warning, critical, state (the saved dict)."""
        where, params = _filters(mic=mic, source=source, prefix="")
        rows = self._execute(
            f"SELECT id, mic, source, at_utc, reason, warning, critical, state_json FROM threshold_changes {where} "
            "ORDER BY id",
            params,
        )
        out = []
        for r in rows:
            row = dict(r)
            row["state"] = self._json(row.pop("state_json"))
            out.append(row)
        return out

    # Alerts

    def add_alert(self, segment_id: int, mic: int, source: str, status: str, score: float, at_utc: str,
                  ack_id: Optional[int] = None) -> None:
        """Record a WARNING or CRITICAL score; ``ack_id``: the acknowledgement in force
        for its machine, which covers it."""
        if status not in ALERT_STATUSES:
            raise ValueError(f"alert status {status!r}: must be one of {', '.join(ALERT_STATUSES)}")
        self._execute(
            "INSERT INTO alerts (segment_id, mic, source, status, score, at_utc, ack_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (segment_id, int(mic), source, status, float(score), at_utc, ack_id),
        )

    def alert_folders(self) -> set[str]:
        """Segments with at least one alert."""
        return {r[0] for r in self._execute(
            "SELECT DISTINCT s.folder FROM alerts a JOIN segments s ON s.id = a.segment_id")}

    def above_warning_folders(self) -> set[str]:
        """Segments with at least one score above the WARNING level it was judged
        against, an alert or not (a lone one is NORMAL: detect.alerts.warning_k)."""
        return {r[0] for r in self._execute(
            "SELECT DISTINCT s.folder FROM scores c JOIN segments s ON s.id = c.segment_id "
            "WHERE c.score IS NOT NULL AND c.warning IS NOT NULL AND c.score > c.warning")}

    def unacknowledged_alert_folders(self) -> set[str]:
        """Segments with an alert that no acknowledgement covers and no label answers:
        the evidence that retention keeps."""
        return {r[0] for r in self._execute(
            "SELECT DISTINCT s.folder FROM alerts a JOIN segments s ON s.id = a.segment_id "
            "WHERE a.ack_id IS NULL AND s.folder NOT IN (SELECT folder FROM labels)")}

    # What operators say

    def add_ack(self, source: str, status: str, folder: str, start_time_utc: str, at_utc: str, note: str = "") -> int:
        """Acknowledge ``source`` in ``status`` (its state in its newest segment
        ``folder``): its alerts so far, and those it raises while it stays in that state,
        are covered. Returns the acknowledgement's id."""
        if status not in ALERT_STATUSES:
            raise ValueError(f"acknowledged status {status!r}: must be one of {', '.join(ALERT_STATUSES)}")
        with self.transaction():
            for row in self._execute("SELECT id FROM acks WHERE source = ? AND ended_utc IS NULL", (source,)):
                self.end_ack(row[0], at_utc, folder)  # replaced by this one
            ack_id = int(self._execute(
                "INSERT INTO acks (source, status, folder, start_time_utc, at_utc, note) VALUES (?, ?, ?, ?, ?, ?)",
                (source, status, folder, start_time_utc, at_utc, note)).lastrowid)
            self._execute("UPDATE alerts SET ack_id = ? WHERE source = ? AND ack_id IS NULL", (ack_id, source))
        return ack_id

    def active_ack(self, source: str) -> Optional[dict[str, Any]]:
        """The acknowledgement in force for ``source``, or None. Row: id, source, status,
        folder, start_time_utc, at_utc, note."""
        row = self._execute("SELECT id, source, status, folder, start_time_utc, at_utc, note FROM acks "
                            "WHERE source = ? AND ended_utc IS NULL ORDER BY id DESC LIMIT 1", (source,)).fetchone()
        return None if row is None else dict(row)

    def end_ack(self, ack_id: int, at_utc: str, folder: str) -> None:
        """End an acknowledgement: its machine's state changed in ``folder``."""
        self._execute("UPDATE acks SET ended_utc = ?, ended_folder = ? WHERE id = ?", (at_utc, folder, ack_id))

    def acks(self) -> list[dict[str, Any]]:
        """Every acknowledgement, oldest first (with ended_utc and ended_folder)."""
        return [dict(r) for r in self._execute("SELECT * FROM acks ORDER BY id")]

    def set_label(self, folder: str, label: str, at_utc: str, note: str = "") -> None:
        """Label a recorded segment ``normal`` (a false alarm: calibration material) or
        ``anomaly`` (a confirmed fault: never trained on). A new label replaces the old.

        Raises
        ------
        ValueError
            ``label`` is not one of LABELS.
        StoreError
            ``folder`` is not a segment this state has seen.
        """
        if label not in LABELS:
            raise ValueError(f"label {label!r}: must be one of {', '.join(LABELS)}")
        if self.phase(folder) is None:
            raise StoreError(f"{self.path}: no segment {folder} has been scored here; give the name of a segment "
                             "folder that `signalcraft detect` has seen (`signalcraft -v detect OUTPUT --since TIME` "
                             "lists them).")
        self._execute("INSERT OR REPLACE INTO labels (folder, label, at_utc, note) VALUES (?, ?, ?, ?)",
                      (folder, label, at_utc, note))

    def labels(self) -> dict[str, str]:
        """Segment folder -> its label."""
        return {r[0]: r[1] for r in self._execute("SELECT folder, label FROM labels")}

    def add_maintenance(self, source: str, at_utc: str, note: str) -> int:
        """Record maintenance of ``source`` at ``at_utc``: `detect` recalibrates the
        machine on the segments that start from then. Ends an acknowledgement in force."""
        with self.transaction():
            ack = self.active_ack(source)
            if ack is not None:
                self.end_ack(ack["id"], at_utc, "")
            return int(self._execute("INSERT INTO maintenance (source, at_utc, note) VALUES (?, ?, ?)",
                                     (source, at_utc, note)).lastrowid)

    def maintenance(self, pending: bool = False) -> list[dict[str, Any]]:
        """Maintenance records, oldest first; ``pending``: only those whose machine has
        not been recalibrated yet. Row: id, source, at_utc, note, recalibrated_utc."""
        where = "WHERE recalibrated_utc IS NULL" if pending else ""
        return [dict(r) for r in self._execute(f"SELECT * FROM maintenance {where} ORDER BY at_utc, id")]

    def mark_recalibrated(self, source: str, at_utc: str) -> None:
        """The pending maintenance of ``source`` is done with: the machine is recalibrated."""
        self._execute("UPDATE maintenance SET recalibrated_utc = ? WHERE source = ? AND recalibrated_utc IS NULL",
                      (at_utc, source))

    def recalibration_folders(self, source: str, since_utc: str) -> list[str]:
        """Segments starting at or after ``since_utc`` in which ``source`` was collected
        for recalibration (rows CALIBRATING in a scored segment), oldest first."""
        return [r[0] for r in self._execute(
            "SELECT DISTINCT s.folder FROM scores c JOIN segments s ON s.id = c.segment_id "
            "WHERE c.source = ? AND c.status = 'CALIBRATING' AND s.phase = 'scored' AND s.start_time_utc >= ? "
            "ORDER BY s.start_time_utc, s.id", (source, since_utc))]

    def alerts(self, since_utc: Optional[str] = None) -> list[dict[str, Any]]:
        """Alerts at or after ``since_utc``, oldest first. Each row: id, segment_id,
        folder, start_time_utc, mic, source, status, score, at_utc."""
        where, params = _filters(since=("a.at_utc", since_utc))
        rows = self._execute(
            "SELECT a.id, a.segment_id, s.folder, s.start_time_utc, a.mic, a.source, a.status, a.score, a.at_utc "
            f"FROM alerts a JOIN segments s ON s.id = a.segment_id {where} ORDER BY a.at_utc, a.id",
            params,
        )
        return [dict(r) for r in rows]

    # The outbox

    def queue_message(self, message_id: str, topic: str, payload: str, retain: bool, created_utc: str,
                      supersede: bool = False) -> None:
        """Queue a message; one whose ``message_id`` is queued already is the same event
        and is not queued twice. ``supersede``: waiting messages of the same topic are
        dropped first (a heartbeat makes the older ones pointless)."""
        if supersede:
            self._execute("DELETE FROM outbox WHERE topic = ? AND sent_utc IS NULL", (topic,))
        self._execute("INSERT OR IGNORE INTO outbox (message_id, topic, payload, retain, created_utc) "
                      "VALUES (?, ?, ?, ?, ?)", (message_id, topic, payload, int(bool(retain)), created_utc))

    def waiting_messages(self, limit: Optional[int] = None, after_id: int = 0) -> list[dict[str, Any]]:
        """Messages not yet acknowledged by the broker, oldest first: id, message_id,
        topic, payload, retain, created_utc."""
        rows = self._execute(
            "SELECT id, message_id, topic, payload, retain, created_utc FROM outbox "
            "WHERE sent_utc IS NULL AND id > ? ORDER BY id LIMIT ?", (after_id, -1 if limit is None else limit))
        return [dict(r) for r in rows]

    def mark_sent(self, ids: Iterable[int], at_utc: str) -> None:
        ids = list(ids)
        for k in range(0, len(ids), 500):
            chunk = ids[k:k + 500]
            self._execute(f"UPDATE outbox SET sent_utc = ? WHERE id IN ({','.join('?' * len(chunk))})",
                          (at_utc, *chunk))

    def outbox_status(self) -> dict[str, Any]:
        """waiting (count), oldest_utc (the oldest waiting message's time, or None), sent
        (count still remembered)."""
        row = self._execute("SELECT COUNT(*), MIN(created_utc), (SELECT COUNT(*) FROM outbox WHERE sent_utc IS "
                            "NOT NULL) FROM outbox WHERE sent_utc IS NULL").fetchone()
        return {"waiting": int(row[0]), "oldest_utc": row[1], "sent": int(row[2])}

    def prune_outbox(self, before_utc: str, sent_before_utc: Optional[str] = None) -> int:
        """Forget messages queued before ``before_utc``, and sent ones queued before
        ``sent_before_utc``; returns how many of them had never been sent (dropped)."""
        dropped = self._execute("SELECT COUNT(*) FROM outbox WHERE created_utc < ? AND sent_utc IS NULL",
                                (before_utc,)).fetchone()[0]
        self._execute("DELETE FROM outbox WHERE created_utc < ?", (before_utc,))
        if sent_before_utc is not None:
            self._execute("DELETE FROM outbox WHERE created_utc < ? AND sent_utc IS NOT NULL", (sent_before_utc,))
        return int(dropped)

    def set_meta(self, key: str, value: str) -> None:
        self._execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> Optional[str]:
        row = self._execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def counts(self) -> dict[str, int]:
        """Totals: segments (and of them calibration), scores, alerts, corrupt files,
        threshold changes."""
        row = self._execute(
            "SELECT (SELECT COUNT(*) FROM segments), "
            "(SELECT COUNT(*) FROM segments WHERE phase = 'calibration'), "
            "(SELECT COUNT(*) FROM scores WHERE score IS NOT NULL), "
            "(SELECT COUNT(*) FROM alerts), "
            "(SELECT COUNT(*) FROM alerts WHERE status = 'CRITICAL'), "
            "(SELECT COALESCE(SUM(n_corrupt), 0) FROM segments), "
            "(SELECT COUNT(*) FROM threshold_changes), "
            "(SELECT COUNT(*) FROM rejected)"
        ).fetchone()
        keys = ("segments", "calibration_segments", "scores", "alerts", "critical_alerts", "corrupt_files",
                "threshold_changes", "rejected_segments")
        return dict(zip(keys, map(int, row)))

    def _json(self, text: str) -> dict[str, Any]:
        try:
            return json.loads(text)
        except ValueError as e:
            raise StoreError(f"{self.path}: a saved threshold or scorer state is not valid JSON ({e}); move the file "
                             "aside and let `signalcraft detect` start a new one.") from None


def _float(x: Optional[float]) -> Optional[float]:
    return None if x is None else float(x)


def _filters(mic: Optional[int] = None, source: Optional[str] = None, since: tuple[str, Optional[str]] = ("", None),
             prefix: str = "c.") -> tuple[str, tuple]:
    """A WHERE clause (always present, so callers may append AND ...) and its parameters."""
    clauses, params = ["1 = 1"], []
    if mic is not None:
        clauses.append(f"{prefix}mic = ?")
        params.append(int(mic))
    if source is not None:
        clauses.append(f"{prefix}source = ?")
        params.append(source)
    if since[1] is not None:
        clauses.append(f"{since[0]} >= ?")
        params.append(since[1])
    return "WHERE " + " AND ".join(clauses), tuple(params)
