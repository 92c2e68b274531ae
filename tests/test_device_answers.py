"""Answers that depend on the GPU, checked on the CPU with ``torch.cuda``'s queries replaced.

No GPU runs these paths in CI, so each GPU-only decision is pinned here: the micro-batch budget
counts the allocator's cached blocks as free, bf16 products only on GPUs that multiply bf16
natively (Ampere on) while ``--dtype auto`` stays bf16 on every GPU, torchrun processes each take
their own GPU, the stage profile reads the peak of the GPU the run used, not only GPU 0's, and a resumed Fisher
sum (read onto the CPU) joins the gradients' device.
"""

from __future__ import annotations

import importlib

import pytest
import torch

micro = importlib.import_module("quantplan.analysis.micro_batches")
models = importlib.import_module("quantplan.analysis.models")
distributed = importlib.import_module("quantplan.analysis.distributed")
profile = importlib.import_module("quantplan.common.profile")

GIB = 1 << 30


def test_the_gpu_micro_batch_budget_counts_cached_blocks_as_free(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 6 * GIB)
    # 4 GiB free on the card + 4 GiB the allocator holds for no tensor (the last batch's activations)
    assert micro.activation_budget("cuda") == int(8 * GIB * micro.GPU_FREE_SHARE)
    assert micro.activation_budget("cpu") == micro.CPU_ACTIVATION_BUDGET


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_products_only_on_gpus_that_multiply_bf16_natively(monkeypatch, capability, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # what analysis.gram.product_dtype asks of a bf16 tensor's device: a T4 or V100 gets float32 products
    assert models.computes_bf16("cuda") is native and models.computes_bf16(torch.device("cuda", 1)) is native


@pytest.mark.parametrize("capability", [(7, 5), (8, 0)])
def test_auto_dtype_is_bf16_on_every_gpu(monkeypatch, capability):
    """A T4 emulates bf16 matmuls, but float32 would double the weights' bytes on a card whose memory is the limit."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert models.resolve_dtype("auto", "cuda") == "bf16"
    monkeypatch.setattr(models, "_cpu_computes_bf16", lambda: False)
    assert models.resolve_dtype("auto", "cpu") == "fp32"


@pytest.mark.parametrize("device, local_rank, expected", [("cuda", "1", [1]), ("cuda:0", "1", []), ("cpu", "1", []),
                                                          ("cuda", None, [])])
def test_torchrun_processes_each_take_their_own_gpu(monkeypatch, device, local_rank, expected):
    chosen, groups = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", groups.append)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    distributed.init_from_environment(device)
    assert chosen == expected  # an explicit index is the user's choice
    assert groups == ["gloo" if device == "cpu" else "nccl"]


def test_the_gpu_peak_is_the_highest_of_every_gpu(monkeypatch):
    peaks, reset = {0: 2 * GIB, 1: 7 * GIB}, []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index=None: peaks[index])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset.append)
    assert profile._gpu_peak() == 7 * GIB  # a run on cuda:1: GPU 0's peak alone would say 2 GiB
    profile._reset_peak()
    assert reset == [0, 1]


def test_a_resumed_fisher_sum_joins_the_gradients_device():
    """--resume reads the saved sums onto the CPU; the next batch's gradients live on the GPU (here: the meta device,
    which refuses to mix with the CPU as CUDA does)."""
    from quantplan.analysis.fisher import GradientProbe

    probe = GradientProbe(torch.nn.Linear(2, 2), ["x"])
    probe.load_state({"x::gradsq": torch.ones(3), "x::gradtokens": torch.tensor([4])})
    probe._pending["x"] = (torch.ones(3, device="meta"), 2)
    probe.commit_batch()
    assert probe.sums["x"].device.type == "meta" and probe.tokens["x"] == 6


@pytest.mark.parametrize("world, expected", [("2", [1]), ("1", [])])
def test_a_launched_process_binds_its_gpu_before_anything_asks_cuda(monkeypatch, world, expected):
    """``quantplan run`` binds it first: ``--max-memory auto`` reads the free memory of ``cuda`` before the analysis."""
    chosen = []
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    distributed.bind_local_gpu("cuda")
    assert chosen == expected
