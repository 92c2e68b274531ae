"""Keep harmless library noise off quantplan's own output; ``--quiet`` turns progress bars off.

bitsandbytes logs, on import, that it could not fetch an optional CPU kernel from a hub
(``Failed to load CPU gemm_4bit_forward from kernels-community``); the fallback it then uses is
the ordinary one, so the line tells a user nothing they can act on.
"""

from __future__ import annotations

import logging
import warnings

_HARMLESS = ("kernels-community", "pip install kernels")


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in _HARMLESS)


def silence_library_noise() -> None:
    """Drop the optional-kernel lines bitsandbytes logs (call before bitsandbytes is imported)."""
    for name in ("bitsandbytes", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).addFilter(_DropHarmless())
    warnings.filterwarnings("ignore", message=".*kernels.*")


def quiet_progress() -> None:
    """Progress bars of transformers, huggingface_hub and datasets off (results still print)."""
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    datasets.disable_progress_bars()
