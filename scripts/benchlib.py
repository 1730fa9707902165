"""Shared by the scripts/bench_*.py: write one section of docs/benchmarks.md.

Each benchmark owns a section between HTML comment markers and replaces only that one,
stamped with the date, the machine and the command that produced it.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nWritten by the scripts/bench_*.py; each section says how to rerun it.\n"


def machine() -> str:
    """A one-line description of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, {platform.system()}"


def write_section(name: str, body: str) -> Path:
    """Replace (or append) section ``name`` of docs/benchmarks.md with ``body``."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    stamp = (
        f"- date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n"
        f"- machine: {machine()}\n"
        f"- command: `{command}`" + (f" at commit {commit}" if commit else "") + "\n"
    )
    section = f"<!-- {name}:begin -->\n{body.strip().splitlines()[0]}\n\n{stamp}\n" + \
        "\n".join(body.strip().splitlines()[1:]).strip() + f"\n<!-- {name}:end -->\n"
    text = REPORT.read_text() if REPORT.exists() else HEADER
    pattern = re.compile(rf"<!-- {re.escape(name)}:begin -->.*?<!-- {re.escape(name)}:end -->\n", re.S)
    text = pattern.sub(lambda m: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(text)
    return REPORT
