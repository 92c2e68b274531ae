"""Several processes (analysis/distributed.py): 2 gloo processes give the single-process table."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pandas as pd
import pytest
from fixtures import CHILD_ENV
from tiny import random_calibration, tiny_llama

from quantplan.analysis import INT8, NF4, SensitivityTable, analyze

_WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from quantplan.analysis import INT8, NF4, analyze
    from quantplan.analysis.distributed import init_from_environment
    from tiny import random_calibration, tiny_llama

    torch.set_num_threads(1)
    init_from_environment("cpu")
    assert dist.get_world_size() == 2
    fisher_samples = None if sys.argv[2] == "all" else int(sys.argv[2])
    analyze(tiny_llama(layers=2), random_calibration(samples=10), [NF4, INT8], batch_size=2, fisher=True,
            out_dir=sys.argv[1], progress=False, model_fingerprint="tiny", fisher_samples=fisher_samples)
    dist.destroy_process_group()
""")


@pytest.mark.slow  # torchrun + two fresh Python processes: ~20 s
@pytest.mark.parametrize("fisher_samples", [None, 2])  # 2 windows: batch 0 alone runs backward, on rank 0
def test_two_gloo_processes_give_the_single_process_table(tmp_path, fisher_samples):
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    env = {**CHILD_ENV, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(worker), str(tmp_path / "out"), str(fisher_samples or "all")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = SensitivityTable.load(tmp_path / "out")
    assert not (tmp_path / "out" / "partial").exists()

    alone = analyze(tiny_llama(layers=2), random_calibration(samples=10), [NF4, INT8], batch_size=2, fisher=True,
                    progress=False, model_fingerprint="tiny", fisher_samples=fisher_samples)
    # 5 batches: rank 0 ran 0, 2, 4 and rank 1 ran 1, 3; sums differ only in float32 addition order
    pd.testing.assert_frame_equal(shared.df, alone.df, rtol=1e-4)
    assert shared.df["output_fisher_error"].notna().any()
    assert (shared.df["tokens"] == alone.df["tokens"]).all()
    assert {k: v for k, v in shared.meta.items() if k != "created"} == \
        {k: v for k, v in alone.meta.items() if k != "created"}
