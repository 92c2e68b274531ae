"""Helpers several test files share (no tests here): repository paths, child-process environment,
a tiny analyzed job, and the real-bitsandbytes reference for a module's output error."""

from __future__ import annotations

import os
from pathlib import Path

import bitsandbytes as bnb
import torch
from tiny import save_tiny_english

REPO = Path(__file__).resolve().parents[1]
#: environment for a child Python process: it imports this checkout's quantplan and the tests' helpers
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def tiny_job(folder: Path, budgets=("+10%", "+33%")):
    """A saved tiny model, its sensitivity table (in ``folder/out``) and plans at ``budgets``."""
    from quantplan.analysis import NF4, analyze, load_calibration, load_model, load_processor, resolve_source
    from quantplan.planner import plan

    source = resolve_source(str(save_tiny_english(folder / "model")))
    calibration = load_calibration(load_processor(source), samples=8, seq_len=64)
    table = analyze(load_model(source), calibration, [NF4], model_id=source.model_id,
                    model_fingerprint=source.fingerprint, out_dir=folder / "out", progress=False)
    plans = [plan(table, b) for b in budgets]
    for p in plans:
        p.save(folder / "out" / f"plan{p.budget.spec.strip('+%')}.json")
    return source, table, plans


def swapped_output_error(model, name, calibration, compute_dtype=torch.float32) -> float:
    """‖Y4 − Y‖²/‖Y‖² with Y4 from a real bitsandbytes Linear4bit fed the module's captured inputs."""
    module = model.get_submodule(name)
    captured = []
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().clone()))
    with torch.no_grad():
        for batch in calibration.batches(4):
            model(**batch, use_cache=False)
    handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
    weight = module.weight.detach()
    swapped = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=compute_dtype,
                                quant_type="nf4", compress_statistics=True)
    swapped.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                       compress_statistics=True, blocksize=64)
    swapped = swapped.to("cpu")
    with torch.no_grad():
        reference = x.float() @ weight.float().T
        quantized = swapped(x.to(compute_dtype)).float()
    return float(((quantized - reference) ** 2).sum() / (reference**2).sum())
