"""Machine and library description shared by the benchmark scripts (written into the result JSON)."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from importlib import metadata


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(threads: int | None = None) -> dict:
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_1_5_15min": os.getloadavg(),  # other load inflates wall-clock timings
        "versions": {p: _version(p) for p in ("torch", "transformers", "bitsandbytes", "numpy", "scipy", "highspy")},
    }
    if threads is not None:
        info["torch_threads"] = threads
    return info
