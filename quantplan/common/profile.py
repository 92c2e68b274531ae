"""Stage profile: wall seconds and peak memory of each step of a run, for ``quantplan run``'s last lines.

``with recording() as profile:`` collects; inside it, ``with stage("measure"):`` times one step
(anywhere in the code: without a recording it records nothing, so the rooms may mark their steps
without depending on the application layer). Either way a stage's end hands the heap's freed pages
back to the operating system (:func:`quantplan.common.heap.release_freed_memory`). Stages nest: an inner
stage's seconds are part of its parent's, and it is listed after it with its depth.

Peak memory is the process's resident-set high-water mark (VmHWM) during the stage. On Linux
the mark is reset at each stage start (``/proc/self/clear_refs``), so each stage reports its
own peak; elsewhere it is ``getrusage``'s lifetime peak, which only grows (``rss_scope`` says
which). On CUDA the peak of ``torch.cuda.max_memory_allocated`` is recorded too.

The resident set mixes two kinds of pages: anonymous memory (tensors, Python objects: what
``--max-memory`` caps) and file-backed pages (safetensors files read through mmap, shared
libraries), which the kernel reclaims when memory is short. The kernel keeps no high-water mark
of the anonymous part alone, so on Linux a small child process samples ``RssAnon`` of this
process every 10 ms while a recording runs (:class:`AnonPeak`) and each stage also reports its
sampled anonymous peak (a spike shorter than the interval can be missed).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .files import atomic_write_text
from .heap import release_freed_memory

PROFILE_FILE = "profile.json"
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class StageTime:
    """One finished stage: its name, depth (0 = top level), wall seconds and peak memory in bytes."""

    name: str
    depth: int
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None = None
    peak_anon_bytes: int | None = None  # sampled peak of anonymous RSS (Linux), without file-backed pages
    cpu_seconds: float | None = None  # the process's CPU time (all threads): on a shared machine, what load does not inflate


@dataclass
class Profile:
    """The stages of one run in the order they started."""

    stages: list[StageTime] = field(default_factory=list)
    rss_scope: str = "stage"  # "stage": peak within the stage; "process": lifetime peak up to its end
    _open: list[dict] = field(default_factory=list, repr=False)
    _anon: AnonPeak | None = field(default=None, repr=False)

    def top_level(self) -> list[StageTime]:
        """The outermost stages (their seconds add up to the profiled part of the run)."""
        return [s for s in self.stages if s.depth == 0]

    def seconds(self, name: str) -> float:
        """Total seconds of the stages called ``name`` (0 if none ran)."""
        return sum(s.seconds for s in self.stages if s.name == name)

    def lines(self) -> list[str]:
        """One line per stage: name, seconds, peak RSS (its anonymous part, GPU memory), indented by depth."""
        out = []
        for s in self.stages:
            anon = "" if s.peak_anon_bytes is None else f" (anonymous {s.peak_anon_bytes / 2**30:.2f})"
            gpu = "" if s.peak_gpu_bytes is None else f", GPU peak {s.peak_gpu_bytes / 2**30:.2f} GiB"
            out.append(f"  {'  ' * s.depth}{s.name:<{24 - 2 * s.depth}} {s.seconds:8.1f} s   "
                       f"peak RSS {s.peak_rss_bytes / 2**30:.2f} GiB{anon}{gpu}")
        return out

    def to_dict(self) -> dict:
        """The JSON form of ``profile.json``."""
        top = self.top_level()
        return {"version": 1, "rss_scope": self.rss_scope, "total_seconds": sum(s.seconds for s in top),
                "total_cpu_seconds": sum(s.cpu_seconds or 0.0 for s in top), "stages": [asdict(s) for s in self.stages]}

    def save(self, path: str | Path) -> Path:
        """Write ``profile.json`` (atomically) and return its path."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path


_current: ContextVar[Profile | None] = ContextVar("quantplan_profile", default=None)


@contextmanager
def recording():
    """Collect the stages run inside the block into a new :class:`Profile` (yielded)."""
    profile = Profile(rss_scope="stage" if _can_reset_peak() else "process", _anon=AnonPeak.start())
    token = _current.set(profile)
    try:
        yield profile
    finally:
        _current.reset(token)
        if profile._anon is not None:
            profile._anon.stop()


@contextmanager
def stage(name: str):
    """Time the block as stage ``name`` of the current recording; at its end the heap's freed pages go back to the
    operating system (:mod:`quantplan.common.heap`), so a stage does not inherit the last one's temporaries."""
    profile = _current.get()
    if profile is None:
        try:
            yield
        finally:
            release_freed_memory()
        return
    _fold_peak(profile)  # the parents keep the peak reached so far before the mark is reset
    _reset_peak()
    if profile._anon is not None:
        profile._anon.reset()
    entry = {"peak": 0, "gpu": None, "anon": None, "index": len(profile.stages)}
    profile._open.append(entry)
    profile.stages.append(None)  # the slot keeps start order; filled at the end
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        _fold_peak(profile)
        release_freed_memory()
        profile._open.pop()
        for parent in profile._open:
            parent["peak"] = max(parent["peak"], entry["peak"])
            parent["gpu"] = _larger(parent["gpu"], entry["gpu"])
            parent["anon"] = _larger(parent["anon"], entry["anon"])
        profile.stages[entry["index"]] = StageTime(name, len(profile._open), seconds, entry["peak"], entry["gpu"],
                                                   entry["anon"], cpu)


def _fold_peak(profile: Profile) -> None:
    """Fold the current high-water marks (RSS, GPU, anonymous RSS) into every open stage, before a mark is reset."""
    peak, gpu = rss_peak_bytes(), _gpu_peak()
    anon = None if profile._anon is None else profile._anon.sample()
    for entry in profile._open:
        entry["peak"] = max(entry["peak"], peak)
        entry["gpu"] = _larger(entry["gpu"], gpu)
        entry["anon"] = _larger(entry["anon"], anon)


def _larger(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def rss_peak_bytes() -> int:
    """The resident-set high-water mark since the last reset (Linux) or since the process started."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _can_reset_peak() -> bool:
    return _CLEAR_REFS.exists() and _STATUS.exists()


def _reset_peak() -> None:
    """Start a new high-water mark (Linux: write 5 to clear_refs); elsewhere nothing to do."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):  # the run's device need not be the current one (cuda:1)
            torch.cuda.reset_peak_memory_stats(index)


def _gpu_peak() -> int | None:
    """The highest allocation peak of any GPU since :func:`_reset_peak` (one GPU per run: its peak); None without CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return max(int(torch.cuda.max_memory_allocated(index)) for index in range(torch.cuda.device_count()))


def anon_rss_bytes() -> int | None:
    """Anonymous resident memory now (``RssAnon`` of ``/proc/self/status``, Linux), or None where it is not shown."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_SAMPLER = r"""
import os, select, sys
status, interval = f"/proc/{sys.argv[1]}/status", float(sys.argv[2])
def now():
    with open(status, "rb") as f:
        text = f.read()
    start = text.index(b"RssAnon:") + 8
    return int(text[start:text.index(b"kB", start)]) * 1024
peak = now()
while True:
    ready = select.select([0], [], [], interval)[0]
    try:
        value = now()
    except (OSError, ValueError):
        break
    peak = max(peak, value)
    if ready:
        command = os.read(0, 1)
        if not command or command == b"q":
            break
        if command == b"r":
            peak = value
        os.write(1, b"%d\n" % peak)
"""


class AnonPeak:
    """A sampled high-water mark of anonymous resident memory, kept by a small child process that reads
    ``RssAnon`` of this process's ``/proc/<pid>/status`` every ``interval`` seconds (the kernel keeps a
    mark, VmHWM, only for the whole resident set). A process, not a thread: it adds no thread or
    allocation to the process it measures, whose heap growth was seen to depend on allocation order
    (benchmarks/README.md, streaming_run section)."""

    def __init__(self, child: subprocess.Popen):
        self._child = child

    @classmethod
    def start(cls, interval: float = 0.01) -> AnonPeak | None:
        """A running sampler, or None where the system does not show anonymous RSS (not Linux)."""
        if anon_rss_bytes() is None:
            return None
        try:
            child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _SAMPLER, str(os.getpid()), str(interval)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                     start_new_session=True)  # a Ctrl-C of the run does not kill the sampler
        except OSError:
            return None
        return cls(child)

    def sample(self) -> int | None:
        """The peak since the last reset, the current value included (None if the sampler has gone)."""
        return self._ask(b"p")

    def reset(self) -> None:
        """Start a new mark at the current value."""
        self._ask(b"r")

    def stop(self) -> None:
        """End the sampling process."""
        try:
            self._child.stdin.write(b"q")  # quit, even where a forked process still holds the pipe open
            self._child.stdin.close()
        except OSError:
            pass
        try:
            self._child.wait(timeout=1)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()
        self._child.stdout.close()

    def _ask(self, command: bytes) -> int | None:
        now = anon_rss_bytes()
        try:
            self._child.stdin.write(command)
            reply = self._child.stdout.readline()
        except OSError:
            return None
        return max(int(reply), now or 0) if reply.strip() else None
