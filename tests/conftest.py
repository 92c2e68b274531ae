"""Shared fixtures: tiny saved models (fast) and the offline SmolLM2 (slow, marked)."""

from __future__ import annotations

import os
import signal
import warnings

import pytest
from tiny import save_tiny

warnings.filterwarnings("ignore", message=".*kernels.*")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def sigint_delivered():
    """Ctrl-C as in a terminal. A suite started in the background (``nohup``, ``&`` without job control) inherits SIGINT
    ignored, which the analysis rightly leaves ignored (``analysis.interrupts``); the tests that press Ctrl-C
    (``os.kill(pid, SIGINT)``) need it delivered."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny Llama (untied lm_head) with a word-level tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_source(tiny_dir):
    from quantplan.analysis import resolve_source

    return resolve_source(str(tiny_dir))


@pytest.fixture(scope="session")
def smol_source():
    """The offline default model (converted once to a cached bf16 folder)."""
    from quantplan.analysis import resolve_source

    return resolve_source(None)


@pytest.fixture(scope="session")
def smol_model(smol_source):
    from quantplan.analysis import load_model

    return load_model(smol_source)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_source):
    from quantplan.analysis import load_processor

    return load_processor(smol_source)
