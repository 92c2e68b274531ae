"""In-memory analyze(): a run killed with SIGKILL after a flush resumes to the uninterrupted table."""

from __future__ import annotations

import textwrap

import pandas as pd
import pytest
from killing import run_and_kill
from tiny import random_calibration, tiny_llama

from quantplan.analysis import NF4, analyze

_CHILD = textwrap.dedent("""
    import sys, time
    from quantplan.analysis import NF4, analyze
    from tiny import random_calibration, tiny_llama

    model = tiny_llama()
    model.model.layers[0].register_forward_hook(lambda *args: time.sleep(0.3))  # slow enough to kill midway
    analyze(model, random_calibration(samples=16), [NF4], batch_size=2, out_dir=sys.argv[1], checkpoint_seconds=0,
            progress=False)
""")


@pytest.mark.slow  # a fresh Python process: ~10 s
def test_sigkill_after_a_flush_then_resume_gives_the_same_table(tmp_path):
    done = run_and_kill(_CHILD, [str(tmp_path)], tmp_path / "partial" / "state.json", "batches_done", 3)
    assert 3 <= done < 8

    calibration = random_calibration(samples=16)
    resumed = analyze(tiny_llama(), calibration, [NF4], batch_size=2, out_dir=tmp_path, resume=True, progress=False)
    expected = analyze(tiny_llama(), calibration, [NF4], batch_size=2, progress=False)
    pd.testing.assert_frame_equal(resumed.df, expected.df, rtol=1e-6)
    assert not (tmp_path / "partial").exists()
