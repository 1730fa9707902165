"""What `detect` prints and what `report` writes.

``machine_status`` rolls scored rows up to one state per machine; ``format_rows``
renders them as a table, JSON or CSV. ``write_report`` writes the HTML report: an
overview of the machines, and per machine its timeline on clock time and its log-mel
images (``index.html``, ``images/``), plus ``summary.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import re
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ..config import Config
from ..files import atomic_write, storage_error, write_json
from ..segments import ManifestError, TensorError, open_segment
from . import thresholds as th
from .run import CALIBRATING, RANK as _RANK, DetectResult, Row, state_path
from .store import Store

log = logging.getLogger(__name__)

_COLUMNS = ("folder", "start_time", "mic", "source", "score", "warning", "critical", "status")


def stored_rows(config: Config, output_dir: Path, since_utc: str) -> list[Row]:
    """Rows stored for segments starting at or after ``since_utc`` (``clock.parse_time``
    in ISO form)."""
    with Store(state_path(config, output_dir), create=False) as store:
        return [Row(r["folder"], r["start_time_utc"], r["mic"], r["source"], r["score"], r["warning"],
                    r["critical"], r["status"], bool(r["acknowledged"])) for r in store.scores(since_utc=since_utc)]


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
    acknowledged: bool = False  # in alarm, and an acknowledgement covers it


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
            sum(r.status != th.NORMAL for rs in segments.values() for r in rs),
            worst.status != th.NORMAL and all(r.acknowledged for r in latest if r.status != th.NORMAL)))
    return out


def _ratio(r: Row) -> Optional[float]:
    return r.score / r.critical if r.score is not None and r.critical else None


def format_machines(machines: list[MachineStatus]) -> str:
    """For the log: 'P-101 CRITICAL since 2026-12-01T08:11:28 (mics 0,1; worst at mic 1,
    2.3x its critical level; 4 alerts)'."""
    return "; ".join(
        f"{m.source} {m.status}{' (acknowledged)' if m.acknowledged else ''} since {m.since[:19]}"
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
        lines.append(f"{'machine':<{width}}  {'status':<9}  {'since (UTC)':<20}  {'newest segment':<22} "
                     f"{'mics':<8} {'x critical':>10}  alerts")
        for m in machines:
            status = m.status + "*" * m.acknowledged
            lines.append(f"{m.source:<{width}}  {status:<9}  {m.since[:19]:<20}  {m.folder:<22} "
                         f"{','.join(map(str, m.mics)) or '-':<8} {_num(m.ratio)}  {m.alerts:>6}")
        if any(m.acknowledged for m in machines):
            lines.append("* acknowledged (`signalcraft ack`): silent until its state changes")
    lines.append(f"{result.segments} new segments, {result.anomalies} alerts "
                 f"({result.critical} CRITICAL)"
                 + (f", {result.acknowledged} acknowledged" if result.acknowledged else "")
                 + (f", recalibrated after maintenance: {', '.join(result.recalibrated)}" if result.recalibrated else "")
                 + f", {result.corrupt} corrupt tensors skipped"
                 + (f", {result.rejected} folders rejected (unusable manifest, see the log)" if result.rejected else ""))
    return "\n".join(lines) + "\n"


def _num(x: Optional[float]) -> str:
    return f"{x:>10.4g}" if x is not None else f"{'-':>10}"


def write_report(config: Config, output_dir: Path, report_dir: Path, since_utc: Optional[str] = None) -> Path:
    """Write ``index.html``, its images (``images/``) and ``summary.json`` in
    ``report_dir`` for the segments starting at or after ``since_utc`` (all by default);
    returns the path of ``summary.json``.

    The page: an overview table (one row per machine: state, since when, microphones,
    worst score against its critical level, alerts, acknowledgement, last maintenance),
    then per machine its timeline on clock time (score / critical level per microphone,
    calibration and recalibration shaded, maintenance marked, alerts as dots, hollow when
    acknowledged) and the log-mel images of its worst segment and of a typical NORMAL one
    in Hz with a dB colour bar, and the operators' records.

    Raises
    ------
    StoreError
        No detection state yet.
    StorageError
        The report folder cannot be written; the message names it.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (cron)

    with Store(state_path(config, output_dir), create=False) as store:
        stored = store.scores(since_utc=since_utc)
        acks, labels = store.acks(), store.labels()
        maintenance = store.maintenance()
        counts = store.counts()
    images = report_dir / "images"
    try:
        images.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(images, e) from None
    rows = [Row(r["folder"], r["start_time_utc"], r["mic"], r["source"], r["score"], r["warning"], r["critical"],
                r["status"], bool(r["acknowledged"])) for r in stored]
    # The machines in alarm first, the worst at the top.
    machines = sorted(machine_status(rows), key=lambda m: (-_RANK[m.status], m.source))
    phases = {r["folder"]: r["phase"] for r in stored}
    sections = []
    for k, m in enumerate(machines):
        mine = [r for r in rows if r.source == m.source]
        stem = f"{k:02d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', m.source)}"
        timeline = images / f"{stem}_timeline.png"
        _plot_timeline(timeline, m.source, mine, phases, config.capture.segment_seconds,
                       [x for x in maintenance if x["source"] == m.source])
        mels = _plot_mels(images / f"{stem}_mels.png", output_dir, config, mine)
        sections.append((m, timeline, mels))
    page = _page(output_dir, machines, sections, acks, labels, maintenance, counts, since_utc)
    atomic_write(report_dir / "index.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))
    last_maintenance = {x["source"]: x for x in maintenance}
    return write_json(report_dir / "summary.json", {
        "counts": counts,
        "since_utc": since_utc,
        "machines": [{**dataclasses.asdict(m), "last_maintenance": last_maintenance.get(m.source)} for m in machines],
    })


def _times(rows: list[Row]):
    import datetime as dt

    return [dt.datetime.fromisoformat(r.start_time) for r in rows]


def _plot_timeline(path: Path, source: str, rows: list[Row], phases: dict[str, str], segment_s: float,
                   maintenance: list[dict]) -> None:
    """Score / critical level per microphone over clock time."""
    import datetime as dt

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.4))
    length = dt.timedelta(seconds=segment_s)
    calibrating = [r for r in rows if r.status == CALIBRATING]
    for label, color, chosen in (
            ("calibration", "0.85", [r for r in calibrating if phases.get(r.folder) == "calibration"]),
            ("recalibration after maintenance", "#cfe3ff",
             [r for r in calibrating if phases.get(r.folder) == "scored"])):
        for n, t in enumerate(sorted(set(_times(chosen)))):  # one span per segment: gaps stay visible
            ax.axvspan(t, t + length, color=color, lw=0, label=label if n == 0 else None)
    scored = [r for r in rows if r.score is not None and r.critical]
    for mic in sorted({r.mic for r in scored}):
        at = [r for r in scored if r.mic == mic]
        ax.plot(_times(at), [r.score / r.critical for r in at], lw=1, marker=".", ms=3, label=f"mic {mic}")
    ax.axhline(1.0, color="red", lw=1, ls="--", label="CRITICAL level")
    warning = [r.warning / r.critical for r in scored if r.warning is not None]
    if warning:
        ax.axhline(float(np.median(warning)), color="orange", lw=1, ls="--", label="WARNING level")
    for status, color in ((th.WARNING, "orange"), (th.CRITICAL, "red")):
        for acked in (False, True):
            hit = [r for r in scored if r.status == status and r.acknowledged == acked]
            if hit:
                ax.scatter(_times(hit), [r.score / r.critical for r in hit], s=28, zorder=3,
                           facecolors="none" if acked else color, edgecolors=color,
                           label=f"{status}{' (acknowledged)' if acked else ''}")
    for n, x in enumerate(maintenance):
        ax.axvline(dt.datetime.fromisoformat(x["at_utc"]), color="tab:blue", lw=1.5,
                   label="maintenance" if n == 0 else None)
    ax.set(title=f"{source}: score against its CRITICAL level", ylabel="score / CRITICAL level", xlabel="time (UTC)")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)  # beside, not on, the data
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def _plot_mels(path: Path, output_dir: Path, config: Config, rows: list[Row]) -> Optional[Path]:
    """The worst segment's log-mel image beside a typical NORMAL one's, at the
    microphone where the machine scored worst; None when no tensor is on disk."""
    import librosa.display
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.score is not None and r.critical]
    if not scored:
        return None
    worst = max(scored, key=lambda r: r.score / r.critical)
    normal = sorted((r for r in scored if r.mic == worst.mic and r.status == th.NORMAL), key=lambda r: r.score)
    typical = normal[len(normal) // 2] if normal else None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    mesh = None
    for ax, row, title in ((axes[0], worst, "worst"), (axes[1], typical, "typical NORMAL")):
        loaded = _image(output_dir, row.folder, row.mic, row.source) if row is not None else None
        if loaded is None:
            ax.text(0.5, 0.5, "no NORMAL segment yet" if row is None else "tensor no longer on disk",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set(title=title)
            ax.set_axis_off()
            continue
        image, features = loaded
        mesh = librosa.display.specshow(
            image, ax=ax, sr=features["sample_rate"], hop_length=features["hop_length"], x_axis="time",
            y_axis="mel", fmin=features["f_min"], fmax=features["f_max"], cmap="magma",
            vmin=config.features.floor_db, vmax=0)
        ax.set(title=f"{title}: {row.status}\n{row.folder}, mic {row.mic}", xlabel="time in the segment (s)")
    fig.subplots_adjust(bottom=0.17, top=0.84)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes, format="%+.0f dB", label="level re full scale")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return path


def _image(output_dir: Path, folder: str, mic: int, source: str):
    """(log-mel image, feature settings) of (mic, source) in a stored segment, or None
    when the segment or its tensor is gone or unusable (logged)."""
    try:
        segment = open_segment(output_dir / folder)
        return segment.load_tensor(mic, source)[0].numpy(), segment.manifest.features
    except FileNotFoundError:
        return None
    except (ManifestError, TensorError) as e:
        log.warning("report: %s", e)
        return None


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.7em; text-align: left; }
th { background: #eee; }
td.NORMAL { background: #d9f2d9; } td.WARNING { background: #ffe4b3; } td.CRITICAL { background: #ffb3b3; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.missing { color: #a00; }
section { margin-top: 2em; border-top: 1px solid #ccc; }
"""
# An image that fails to load says so in the page; the counts are on <body> (data-images-*).
_SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  images.forEach(function (img) {
    if (!(img.complete && img.naturalWidth > 0)) {
      var note = document.createElement('p'); note.className = 'missing';
      note.textContent = 'image missing: ' + img.getAttribute('src'); img.replaceWith(note);
    }
  });
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(function (i) { return i.naturalWidth > 0; }).length;
});
"""


def _page(output_dir: Path, machines: list[MachineStatus], sections, acks: list[dict], labels: dict[str, str],
          maintenance: list[dict], counts: dict, since_utc: Optional[str]) -> str:
    from html import escape
    from urllib.parse import quote

    from .. import clock

    def src(path: Path) -> str:
        return "images/" + quote(path.name)

    last_maintenance = {x["source"]: x for x in maintenance}
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>signalcraft: {escape(str(output_dir))}</title><style>{_STYLE}</style>",
           f"<script>{_SCRIPT}</script></head><body>",
           f"<h1>Machine states: {escape(str(output_dir))}</h1>",
           f"<p>Written {escape(clock.now_iso()[:19])} UTC; segments "
           f"{'since ' + escape(since_utc[:19]) + ' UTC' if since_utc else 'all stored'}. "
           f"{counts.get('segments', 0)} segments in the state, {counts.get('alerts', 0)} alerts.</p>"]
    if not machines:
        out.append("<p>No machine scored yet: the detector is still calibrating.</p>")
    out.append('<table id="machines"><tr><th>machine</th><th>state</th><th>since (UTC)</th><th>newest segment</th>'
               "<th>microphones in alarm</th><th>worst score / CRITICAL level</th><th>alerts</th>"
               "<th>acknowledged</th><th>last maintenance</th></tr>")
    for m in machines:
        x = last_maintenance.get(m.source)
        out.append(
            f'<tr><td><a href="#m{machines.index(m)}">{escape(m.source)}</a></td>'
            f'<td class="{m.status}">{m.status}</td><td>{escape(m.since[:19])}</td><td>{escape(m.folder)}</td>'
            f"<td>{escape(','.join(map(str, m.mics)) or '-')}</td>"
            f"<td>{'-' if m.ratio is None else f'{m.ratio:.2f}'}</td><td>{m.alerts}</td>"
            f"<td>{'yes' if m.acknowledged else '-'}</td>"
            f"<td>{escape(x['at_utc'][:19] + ': ' + x['note']) if x else '-'}</td></tr>")
    out.append("</table>")
    for k, (m, timeline, mels) in enumerate(sections):
        out.append(f'<section id="m{k}"><h2>{escape(m.source)}: <span class="{m.status}">{m.status}</span></h2>')
        out.append(f'<img src="{src(timeline)}" alt="timeline of {escape(m.source)}">')
        if mels is not None:
            out.append(f'<img src="{src(mels)}" alt="log-mel images of {escape(m.source)}">')
        events = ([(a["at_utc"], f"acknowledged {a['status']} ({a['folder']})"
                    + (f", ended in {a['ended_folder'] or 'maintenance'}" if a["ended_utc"] else ", in force")
                    + (f": {a['note']}" if a["note"] else "")) for a in acks if a["source"] == m.source]
                  + [(x["at_utc"], f"maintenance: {x['note']}" + (
                      f" (recalibrated {x['recalibrated_utc'][:19]})" if x["recalibrated_utc"]
                      else " (recalibration pending)")) for x in maintenance if x["source"] == m.source])
        if events:
            out.append("<ul>" + "".join(f"<li>{escape(t[:19])} UTC: {escape(text)}</li>" for t, text in sorted(events))
                       + "</ul>")
        out.append("</section>")
    if labels:
        out.append("<section><h2>Labelled segments</h2><ul>"
                   + "".join(f"<li>{escape(f)}: {escape(v)}</li>" for f, v in sorted(labels.items())) + "</ul></section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def summary_lines(summary_path: Path) -> Iterable[str]:
    """A one-screen terminal summary from summary.json: one line per machine."""
    data = json.loads(summary_path.read_text())
    for m in data["machines"]:
        yield (f"{m['source']}: {m['status']}{' (acknowledged)' if m['acknowledged'] else ''} since "
               f"{m['since'][:19]} UTC, {m['alerts']} alerts, newest segment {m['folder']}")
    c = data["counts"]
    yield f"{c.get('segments', 0)} segments, {c.get('alerts', 0)} alerts, {c.get('corrupt_files', 0)} corrupt files"
