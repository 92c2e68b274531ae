"""The exported checkpoint measured block by block (analysis/stream_checkpoint.py, reports/compare_capped.py): its
per-token numbers equal those of the same checkpoint loaded whole by ``from_pretrained``, and are close to the
simulated plan's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import random_calibration, save_tiny

from quantplan.analysis import NF4, analyze, load_model, resolve_source
from quantplan.analysis.formats import NF4_BS32
from quantplan.analysis.memory import footprint_16bit
from quantplan.analysis.stream_checkpoint import CheckpointWeights, ExportedCheckpoint
from quantplan.analysis.stream_variants import StreamOptions
from quantplan.analysis.stream_weights import StreamingUnsupported, skeleton
from quantplan.planner import KEEP, plan
from quantplan.planner.prequantized_stream import write_streamed
from quantplan.planner.reasons import Reason, ReasonKind
from quantplan.planner.skiplist import build_skip_list
from quantplan.reports.fidelity import heldout_reference, measure, measure_variants_streamed

FORMATS = {NF4.name: NF4, NF4_BS32.name: NF4_BS32}


def exported(tmp_path: Path, dtype: torch.dtype, tie: bool, head: str):
    """(source folder, its model in ``dtype``, a menu plan cycling nf4 / nf4-bs32 / 16-bit, its checkpoint folder)."""
    folder = save_tiny(tmp_path / "model", layers=2, tie=tie)
    source = resolve_source(str(folder))
    model = load_model(source, dtype=dtype)
    table = analyze(model, random_calibration(samples=2), [NF4, NF4_BS32], progress=False,
                    model_fingerprint=source.fingerprint)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    choices = {n: (NF4.name, NF4_BS32.name, KEEP)[i % 3] for i, n in enumerate(names)}
    choices["lm_head"] = head
    kept = [n for n, c in choices.items() if c == KEEP]
    p = replace(plan(table, "+5%"), choices=choices,
                reasons={n: Reason(ReasonKind.PINNED_KEEP if c == KEEP else ReasonKind.PINNED_QUANTIZE, "test")
                         for n, c in choices.items()},
                skip_modules=build_skip_list(kept, [n for n in choices if n not in kept]))
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    write_streamed(folder, p, checkpoint, torch.bfloat16)
    return folder, model, p, checkpoint


@pytest.mark.parametrize(("dtype", "tie", "head"), [(torch.float32, False, NF4_BS32.name),
                                                    (torch.bfloat16, True, KEEP)])
def test_streamed_checkpoint_equals_its_whole_load(tmp_path, dtype, tie, head):
    folder, model, p, checkpoint = exported(tmp_path, dtype, tie, head)
    ids = random_calibration(samples=5, seed=3).input_ids
    loaded = load_model(resolve_source(str(checkpoint)), dtype=dtype)  # plain from_pretrained: real Linear4bit
    expected = measure(loaded, heldout_reference(model, ids, 2))
    simulated = {n: FORMATS[c] for n, c in p.choices.items() if c != KEEP}
    got = measure_variants_streamed(folder, ids, {"16-bit": None, "checkpoint": ExportedCheckpoint(checkpoint),
                                                  "simulated": simulated}, NF4,
                                    StreamOptions(batch_size=2, dtype=dtype, max_memory="1GB"))
    np.testing.assert_allclose(got["checkpoint"].kld, expected.kld, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(got["checkpoint"].same_top, expected.same_top)
    np.testing.assert_allclose(got["checkpoint"].nll, expected.nll, rtol=1e-6)
    assert len(got["checkpoint"].kld) == 5 * 32 and float(got["16-bit"].kld.max()) == 0
    mine, sim = float(got["checkpoint"].kld.mean()), float(got["simulated"].kld.mean())
    assert mine > 0 and sim > 0 and abs(mine - sim) < 0.5 * sim, (mine, sim)  # close, not identical

    skeleton_model = skeleton(folder, dtype)
    weights = CheckpointWeights(checkpoint, skeleton_model)
    assert weights.footprint(skeleton_model) == footprint_16bit(loaded)
    assert weights.formats() == {n: ("nf4", FORMATS[c].blocksize) for n, c in p.choices.items() if c != KEEP}
    held = weights.held_bytes(skeleton_model, ["model.norm.weight", "lm_head.weight"], dtype)
    if dtype == torch.bfloat16:  # saved in the stream's dtype: the 16-bit head's own tensors, shared
        assert held == 0
    else:  # the bf16 norm beside the fp32 one, and the packed 4-bit lm_head (half a byte a weight)
        assert held == 64 * 2 + 256 * 64 // 2


def test_a_cap_too_small_for_the_checkpoint_stream_is_refused_with_the_fix(tmp_path):
    folder, _, _, checkpoint = exported(tmp_path, torch.float32, False, KEEP)
    with pytest.raises(StreamingUnsupported, match=r"--max-memory \d+(\.\d\d)?[GM]B or more"):
        measure_variants_streamed(folder, random_calibration(samples=2).input_ids,
                                  {"checkpoint": ExportedCheckpoint(checkpoint)}, NF4,
                                  StreamOptions(batch_size=2, max_memory="10kB"))


def test_a_checkpoint_of_another_plan_or_not_4bit_is_refused(tmp_path):
    from quantplan.reports.compare_capped import check_checkpoint_follows

    folder, _, p, checkpoint = exported(tmp_path, torch.float32, False, KEEP)
    formats = CheckpointWeights(checkpoint, skeleton(folder, torch.float32)).formats()
    check_checkpoint_follows(formats, p, checkpoint)  # its own plan: no error
    name = next(n for n, c in p.choices.items() if c == NF4.name)
    with pytest.raises(ValueError, match="was not exported from this plan.*export the plan again"):
        check_checkpoint_follows({**formats, name: ("nf4", 32)}, p, checkpoint)
    with pytest.raises(StreamingUnsupported, match="not a bitsandbytes 4-bit checkpoint"):
        CheckpointWeights(folder, skeleton(folder, torch.float32))
    from quantplan.reports.compare import CompareConfig
    from quantplan.reports.compare_capped import _exported

    all_kept = replace(p, choices=dict.fromkeys(p.choices, KEEP))  # exported as a plain 16-bit checkpoint: no row
    footprint, why = _exported(resolve_source(str(folder)), folder, all_kept, CompareConfig(progress=False))
    assert footprint is None and "plain 16-bit" in why


def test_a_checkpoint_without_a_cap_is_refused_naming_the_fix(tmp_path):
    from quantplan.reports.compare import CompareConfig, compare

    with pytest.raises(ValueError, match="under --max-memory: pass --max-memory SIZE, or leave --checkpoint out"):
        compare(str(tmp_path), [tmp_path / "plan.json"], checkpoint=tmp_path / "checkpoint",
                options=CompareConfig(progress=False))


def test_a_vlm_checkpoint_row_is_skipped_saying_why(tmp_path):
    from vlm_models import save_tiny_vlm

    from quantplan.reports.compare import CompareConfig
    from quantplan.reports.compare_capped import _exported

    source = resolve_source(str(save_tiny_vlm("qwen2_vl", tmp_path / "vlm")))
    footprint, why = _exported(source, tmp_path / "checkpoint", None, CompareConfig(progress=False))
    assert footprint is None and "vision-language" in why
