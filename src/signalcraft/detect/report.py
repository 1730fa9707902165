"""What `detect` prints and what `report` writes.

``format_rows`` renders scored rows as a table, JSON or CSV. ``write_report`` writes,
per (microphone, source), a PNG with the score timeline, the WARNING/CRITICAL levels
and the alerts, beside the log-mel image of the worst segment and of a typical normal
one; plus ``summary.json`` with the current state per machine and alert counts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import Iterable, Optional

from ..config import Config
from ..files import atomic_write, storage_error, write_json
from ..segments import ManifestError, TensorError, open_segment
from ..segments.layout import mic_folder
from . import thresholds as th
from .run import CALIBRATING, DetectResult, Row, state_path
from .store import Store

log = logging.getLogger(__name__)

_COLUMNS = ("folder", "start_time", "mic", "source", "score", "warning", "critical", "status")


def stored_rows(config: Config, output_dir: Path, since_utc: str) -> list[Row]:
    """Rows stored for segments starting at or after ``since_utc`` (``clock.parse_time``
    in ISO form)."""
    with Store(state_path(config, output_dir), create=False) as store:
        return [Row(r["folder"], r["start_time_utc"], r["mic"], r["source"], r["score"], r["warning"],
                    r["critical"], r["status"]) for r in store.scores(since_utc=since_utc)]


_RANK = {th.NORMAL: 0, th.WARNING: 1, th.CRITICAL: 2}


@dataclasses.dataclass(frozen=True)
class MachineStatus:
    """One machine (asset) over some scored rows: its state in its newest segment (the
    worst over its microphones), since when, and where it sounds most wrong."""

    source: str
    status: str  # NORMAL, WARNING or CRITICAL
    since: str  # start (UTC) of the first of the newest run of segments in this state, among the rows
    folder: str  # newest scored segment
    mics: tuple[int, ...]  # microphones at which it is WARNING or CRITICAL in that segment
    mic: int  # microphone with the highest score relative to its critical level there
    ratio: Optional[float]  # that score / its critical level
    alerts: int  # WARNING or CRITICAL rows of this machine among the rows


def machine_status(rows: Iterable[Row]) -> list[MachineStatus]:
    """Per machine, in order of first appearance; calibrating rows are left out."""
    by_source: dict[str, dict[str, list[Row]]] = {}
    for r in rows:
        if r.status in _RANK:
            by_source.setdefault(r.source, {}).setdefault(r.start_time, []).append(r)
    out = []
    for source, segments in by_source.items():
        times = sorted(segments)
        state = {t: max(_RANK[r.status] for r in segments[t]) for t in times}
        latest = segments[times[-1]]
        worst = max(latest, key=lambda r: (_RANK[r.status], _ratio(r) or 0.0))
        k = len(times) - 1
        while k > 0 and state[times[k - 1]] == state[times[-1]]:
            k -= 1
        out.append(MachineStatus(
            source, worst.status, times[k], worst.folder,
            tuple(sorted(r.mic for r in latest if r.status != th.NORMAL)), worst.mic, _ratio(worst),
            sum(r.status != th.NORMAL for rs in segments.values() for r in rs)))
    return out


def _ratio(r: Row) -> Optional[float]:
    return r.score / r.critical if r.score is not None and r.critical else None


def format_machines(machines: list[MachineStatus]) -> str:
    """For the log: 'P-101 CRITICAL since 2026-12-01T08:11:28 (mics 0,1; worst at mic 1,
    2.3x its critical level; 4 alerts)'."""
    return "; ".join(
        f"{m.source} {m.status} since {m.since[:19]}"
        + (f" (mics {','.join(map(str, m.mics))}; worst at mic {m.mic}, {m.ratio:.2g}x its critical level; "
           f"{m.alerts} alert{'s' * (m.alerts != 1)}) in {m.folder}" if m.ratio is not None else f" in {m.folder}")
        for m in machines)


def format_rows(rows: list[Row], result: DetectResult, style: str,
                machines: Optional[list[MachineStatus]] = None, per_tensor: bool = False) -> str:
    """``style``: table (for people), json or csv (for scripts). The table gives the
    state of each machine (by default ``machine_status(rows)``), and with
    ``per_tensor`` the rows too; JSON gives both, CSV the rows."""
    machines = machine_status(rows) if machines is None else machines
    if style == "json":
        return json.dumps({
            "segments": result.segments, "corrupt_tensors": result.corrupt, "rejected_segments": result.rejected,
            "trained": result.trained,
            "calibration": {"collected": result.calibration[0], "needed": result.calibration[1]},
            "machines": [dataclasses.asdict(m) for m in machines],
            "rows": [dataclasses.asdict(r) for r in rows],
        }, indent=2) + "\n"
    if style == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(_COLUMNS)
        for r in rows:
            writer.writerow([getattr(r, c) if getattr(r, c) is not None else "" for c in _COLUMNS])
        return out.getvalue()
    lines = []
    scored = [r for r in rows if r.status != CALIBRATING]
    if scored and per_tensor:
        lines.append(f"{'segment':<22} {'mic':>3}  {'source':<10} {'score':>10} {'warning':>10} {'critical':>10}  status")
        for r in scored:
            lines.append(f"{r.folder:<22} {r.mic:>3}  {r.source:<10} {_num(r.score)} {_num(r.warning)} "
                         f"{_num(r.critical)}  {r.status}")
    if result.calibration[1]:
        lines.append(f"calibrating {result.calibration[0]}/{result.calibration[1]} segments: the detector trains "
                     "itself once enough normal operation has been recorded")
    if result.trained:
        lines.append("detector trained and thresholds set")
    if machines:
        width = max(7, *(len(m.source) for m in machines))
        lines.append(f"{'machine':<{width}}  {'status':<8}  {'since (UTC)':<20}  {'newest segment':<22} "
                     f"{'mics':<8} {'x critical':>10}  alerts")
        for m in machines:
            lines.append(f"{m.source:<{width}}  {m.status:<8}  {m.since[:19]:<20}  {m.folder:<22} "
                         f"{','.join(map(str, m.mics)) or '-':<8} {_num(m.ratio)}  {m.alerts:>6}")
    lines.append(f"{result.segments} new segments, {result.anomalies} alerts "
                 f"({result.critical} CRITICAL), {result.corrupt} corrupt tensors skipped"
                 + (f", {result.rejected} folders rejected (unusable manifest, see the log)" if result.rejected else ""))
    return "\n".join(lines) + "\n"


def _num(x: Optional[float]) -> str:
    return f"{x:>10.4g}" if x is not None else f"{'-':>10}"


def write_report(config: Config, output_dir: Path, report_dir: Path) -> list[Path]:
    """PNG per (mic, source) and summary.json in ``report_dir``; returns the files."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (cron)
    import matplotlib.pyplot as plt
    import numpy as np

    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(report_dir, e) from None
    with Store(state_path(config, output_dir), create=False) as store:
        rows = [r for r in store.scores() if r["score"] is not None]
        alerts = store.alerts()
        counts = store.counts()
    written, machines = [], []
    for mic, source in sorted({(r["mic"], r["source"]) for r in rows}):
        mine = [r for r in rows if r["mic"] == mic and r["source"] == source]
        scores = np.array([r["score"] for r in mine])
        worst = mine[int(np.argmax(scores))]
        normal = [r for r in mine if r["status"] == th.NORMAL] or mine
        typical = normal[int(np.argsort([r["score"] for r in normal])[len(normal) // 2])]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [2.2, 1, 1]})
        x = np.arange(len(mine))
        axes[0].plot(x, scores, lw=1, color="black", label="score")
        for key, color in (("warning", "orange"), ("critical", "red")):
            axes[0].plot(x, [r[key] if r[key] is not None else np.nan for r in mine], color=color, lw=1, label=key)
        for status, color in ((th.WARNING, "orange"), (th.CRITICAL, "red")):
            hit = [i for i, r in enumerate(mine) if r["status"] == status]
            axes[0].scatter(hit, scores[hit], color=color, s=14, zorder=3)
        axes[0].set(title=f"{mic_folder(mic)} / {source}: anomaly score", xlabel="segment (oldest first)", ylabel="score")
        axes[0].legend(loc="upper left")
        for ax, row, title in ((axes[1], worst, "worst"), (axes[2], typical, "typical normal")):
            image = _image(output_dir, row["folder"], mic, source)
            if image is not None:
                ax.imshow(image, origin="lower", aspect="auto", vmin=config.features.floor_db, vmax=0, cmap="magma")
            else:
                ax.text(0.5, 0.5, "tensor no longer on disk", ha="center", transform=ax.transAxes)
            ax.set(title=f"{title}: {row['folder']}", xlabel="frame", ylabel="mel band")
        fig.tight_layout()
        png = report_dir / f"{mic_folder(mic)}_{source}.png"
        atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
        plt.close(fig)
        written.append(png)
        last = mine[-1]
        machines.append({"mic": mic, "source": source, "status": last["status"], "last_segment": last["folder"],
                         "score": last["score"], "warning": last["warning"], "critical": last["critical"],
                         "warnings": sum(a["status"] == th.WARNING for a in alerts if a["mic"] == mic and a["source"] == source),
                         "criticals": sum(a["status"] == th.CRITICAL for a in alerts if a["mic"] == mic and a["source"] == source)})
    written.append(write_json(report_dir / "summary.json", {"counts": counts, "machines": machines}))
    return written


def _image(output_dir: Path, folder: str, mic: int, source: str):
    """The log-mel image of (mic, source) in a stored segment, or None when the segment
    or its tensor is gone or unusable (logged)."""
    try:
        segment = open_segment(output_dir / folder)
        return segment.load_tensor(mic, source)[0].numpy()
    except FileNotFoundError:
        return None
    except (ManifestError, TensorError) as e:
        log.warning("report: %s", e)
        return None


def summary_lines(summary_path: Path) -> Iterable[str]:
    """A one-screen terminal summary from summary.json."""
    data = json.loads(summary_path.read_text())
    yield f"{'mic':>3}  {'source':<10} {'now':<9} {'warnings':>8} {'criticals':>9}  last segment"
    for m in data["machines"]:
        yield f"{m['mic']:>3}  {m['source']:<10} {m['status']:<9} {m['warnings']:>8} {m['criticals']:>9}  {m['last_segment']}"
    c = data["counts"]
    yield f"{c.get('segments', 0)} segments, {c.get('alerts', 0)} alerts, {c.get('corrupt_files', 0)} corrupt files"
