"""Start a Python snippet in a fresh process and SIGKILL it once its partial state has progressed far enough."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fixtures import CHILD_ENV


def run_and_kill(code: str, args: list[str], state: Path, key: str, at_least: int, timeout: float = 120) -> int:
    """Run ``code`` with ``args``; SIGKILL it when ``state``'s ``key`` reaches ``at_least``; return its final value."""
    child = subprocess.Popen([sys.executable, "-c", code, *args], env=CHILD_ENV)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if state.is_file() and json.loads(state.read_text())[key] >= at_least:
            break
        time.sleep(0.02)
    assert child.poll() is None, "the run ended before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return json.loads(state.read_text())[key]
