"""Disk space: retention of old segments and the free-space guard of `record`.

Retention deletes the oldest complete segments beyond ``output.keep_days`` and/or
``output.max_gb``. It never deletes a segment that `detect` has not finished with
(not yet scored, or calibration data of a detector not yet trained), nor one the caller
names as evidence (an alarm not yet acknowledged): those are kept even when that means
staying above the limits, and the counts are reported. A segment's
age is its manifest's start time against ``clock.now()``. A segment is first renamed
into ``.incomplete/`` and then deleted, so a reader never sees half a segment, and a
run killed halfway leaves only staging that ``remove_leftovers`` clears.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import shutil
from pathlib import Path
from typing import Container

from .. import clock
from ..config import OutputConfig
from ..errors import StorageError
from ..files import staging_path
from .reader import list_segments

log = logging.getLogger(__name__)

GB = 1e9  # bytes; disk sizes are quoted in decimal units, as `df -H` and vendors do


@dataclasses.dataclass
class PruneResult:
    """What a retention pass did (or, with ``dry_run``, would do)."""

    deleted: list[str] = dataclasses.field(default_factory=list)  # folder names, oldest first
    freed_bytes: int = 0
    kept_unscored: int = 0  # over a limit, but kept because detect has not finished with them
    kept_evidence: int = 0  # over a limit, but kept as the evidence of an alarm (or a recalibration)
    total_bytes: int = 0  # size of the segments left (counted only when max_gb is set)


def free_gb(path: Path) -> float:
    """Free space (GB) on the filesystem that holds ``path`` or its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / GB


def check_free_space(config: OutputConfig) -> float:
    """Free GB on the output disk.

    Raises
    ------
    StorageError
        Less than ``config.min_free_gb`` is free.
    """
    free = free_gb(config.dir)
    if free < config.min_free_gb:
        raise StorageError(
            f"{config.dir}: only {free:.2f} GB free on this disk, below output.min_free_gb "
            f"({config.min_free_gb:g} GB); not recording. Free space, set output.keep_days or "
            "output.max_gb (applied by `signalcraft detect`), or move output.dir to a larger disk."
        )
    return free


def folder_bytes(folder: Path) -> int:
    """Bytes in the files under ``folder``."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def prune(output_dir: Path, config: OutputConfig, done: Container[str], evidence: Container[str] = (),
          dry_run: bool = False) -> PruneResult:
    """Apply ``config.keep_days`` and ``config.max_gb`` to the segments in ``output_dir``.

    Parameters
    ----------
    done : container of str
        Folder names detect has finished with; only these may be deleted.
    evidence : container of str
        Folder names kept as evidence (not in ``done``), counted apart.
    dry_run : bool
        Report what would be deleted, delete nothing.
    """
    result = PruneResult()
    if config.keep_days is None and config.max_gb is None:
        return result
    # Oldest first. A folder with an unusable manifest is never deleted (it may not be
    # a segment); detect reports it once, so it is not reported again here.
    segments = list_segments(output_dir, on_error=lambda folder, e: log.debug("retention: %s", e))
    now = clock.now()
    sizes = {s.name: folder_bytes(s.path) for s in segments} if config.max_gb is not None else {}
    total = sum(sizes.values())
    doomed = []
    for segment in segments:
        too_old = (config.keep_days is not None
                   and now - segment.start_time > dt.timedelta(days=config.keep_days))
        too_big = config.max_gb is not None and total > config.max_gb * GB
        if not (too_old or too_big):
            continue  # nothing newer is older; space may still be over only if unscored ones block
        if segment.name in evidence:
            result.kept_evidence += 1
            continue
        if segment.name not in done:
            result.kept_unscored += 1
            continue
        doomed.append(segment)
        total -= sizes.get(segment.name, 0)
    for segment in doomed:
        freed = sizes[segment.name] if segment.name in sizes else folder_bytes(segment.path)
        if not dry_run:
            _delete(Path(output_dir), segment.path)
        result.deleted.append(segment.name)
        result.freed_bytes += freed
    result.total_bytes = total
    if result.deleted:
        log.info("retention: %s %d segments (%s ... %s), %.2f GB", "would delete" if dry_run else "deleted",
                 len(result.deleted), result.deleted[0], result.deleted[-1], result.freed_bytes / GB)
    if result.kept_unscored:
        log.warning("retention: kept %d segments over output.keep_days/max_gb because `signalcraft detect` "
                    "has not scored them yet", result.kept_unscored)
    if result.kept_evidence:
        log.warning("retention: kept %d segments over output.keep_days/max_gb as evidence: alerts not acknowledged "
                    "(`signalcraft ack ASSET` or `signalcraft label SEGMENT`) or a recalibration after maintenance",
                    result.kept_evidence)
    return result


def _delete(output_dir: Path, folder: Path) -> None:
    """Unpublish (rename into staging) and then delete one segment folder."""
    # The name pattern of remove_leftovers: a deletion killed halfway is finished later.
    target = staging_path(output_dir, f"{folder.name}.deleting")
    try:
        target.parent.mkdir(exist_ok=True)
        os.rename(folder, target)
    except FileNotFoundError:
        return  # already gone
    except OSError as e:
        raise StorageError(f"{folder}: cannot delete old segment: {e.strerror}. Check the folder's "
                           "owner and mode.") from None
    shutil.rmtree(target, ignore_errors=True)
