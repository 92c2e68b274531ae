"""Ctrl-C and SIGTERM during the in-memory calibration pass wait for the running batch to finish.

The pass accumulates each batch straight into its statistics (no second Gram matrix, see
:mod:`analysis.probe`), so a batch stopped midway cannot be taken back out of them. Inside
:class:`DeferredInterrupt` the first SIGINT or SIGTERM is only noted; the pass calls :meth:`check`
between batches, which raises ``KeyboardInterrupt`` there, where the statistics are whole and can be
saved for ``--resume``. The same signal a second time raises :class:`InterruptNow` at once, mid-batch
if need be: the last flushed state stays what a resume reads. SIGINT then SIGTERM (a launcher such
as torchrun forwarding the terminal's Ctrl-C to its workers) still waits for the batch.
"""

from __future__ import annotations

import os
import signal
import sys


class InterruptNow(KeyboardInterrupt):
    """The second Ctrl-C (or SIGTERM): stop at once, saving nothing new."""


_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class DeferredInterrupt:
    """Context manager: note the first SIGINT/SIGTERM, raise it at :meth:`check`; a repeat stops at once.

    Outside the main thread (where Python takes no signal handlers) it changes nothing. A signal the
    process ignores (``SIG_IGN``, as for a job started in the background) stays ignored.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled  # False: signals act as usual (nothing would be saved, so nothing to wait for)
        self.requested: str | None = None  # the name of the first signal received, until raised
        self._seen: set[int] = set()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> DeferredInterrupt:
        for number in _NAMES if self.enabled else ():
            try:
                previous = signal.getsignal(number)
                if previous is signal.SIG_IGN:
                    continue
                signal.signal(number, self._handle)
            except ValueError:  # not the main thread
                break
            self._previous[number] = previous
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, signal.SIG_DFL if previous is None else previous)  # None: not set from Python
        self._previous.clear()
        if exc_type is None:
            self.check()  # a signal noted after the last check is not lost

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a signal came since the last check (call it between batches)."""
        if self.requested is not None:
            name, self.requested = self.requested, None
            raise KeyboardInterrupt(name)

    def _handle(self, number, frame) -> None:
        name = _NAMES[number]
        if number in self._seen:
            raise InterruptNow(f"{name} twice")
        self._seen.add(number)
        self.requested = self.requested or name
        _say(f"\nquantplan: {name}: stopping after the running batch, then saving for --resume "
             f"({name} again stops at once, keeping the last saved state)\n")


def _say(text: str) -> None:
    """Write to stderr without Python's buffered stream: a signal handler may run in the middle of a write to it."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):  # no file descriptor (a notebook's stream) or a closed one
        pass
