"""The in-memory variant comparison (analysis.reference.for_each_variant) gives the numbers of whole forwards.

Each variant starts at the first decoder layer where it differs from the 16-bit run or an earlier
variant (analysis.shared_prefix), and the 16-bit log-probabilities are made once per batch: the KLs
(verification, refinement) and the per-token comparisons (the report's variants) must equal those of
the plain way, one whole forward of the 16-bit model and one per variant per batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import PaddedCalibration, tiny_llama, whole_forwards

from quantplan.analysis.formats import NF4, NF4_BS32
from quantplan.analysis.reference import InMemoryKLs, KLReference, batch_tokens
from quantplan.analysis.shared_prefix import Fork, PrefixRuns
from quantplan.analysis.simulate import QuantCache
from quantplan.reports.fidelity import measure_variants

LAYERS = 4


def _layer(i: int) -> list[str]:
    return [f"model.layers.{i}.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def _variants() -> dict:
    everything = [n for i in range(LAYERS) for n in _layer(i)]
    late = _layer(2) + _layer(3)
    return {
        "all": everything,
        "late": late,  # layers 0-1 as the 16-bit run
        "16-bit": None,
        "later": {**dict.fromkeys(_layer(2)), **dict.fromkeys(_layer(3), NF4_BS32)},  # layers 0-2 as "late"
        "same": list(late),  # identical to "late"
        "last": _layer(3),  # layers 0-2 as the 16-bit run
        "head": _layer(3) + ["lm_head"],  # differs outside the layers: shares nothing
        "menu": {n: (NF4_BS32 if i % 3 == 0 else None) for i, n in enumerate(everything)},
    }


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(layers=LAYERS).float()
    reference = KLReference(model, PaddedCalibration(), batch_size=4)
    return model, reference, QuantCache(model, NF4)


def _plain_kld(model, reference, cache, names) -> float:
    total = 0.0
    for batch, logits16, logits in whole_forwards(model, reference, cache, names):
        per_token = F.kl_div(torch.log_softmax(logits.float(), -1), torch.log_softmax(logits16.float(), -1),
                             log_target=True, reduction="none").sum(-1)
        total += float((per_token * batch["attention_mask"]).sum())
    return total / reference.tokens


def test_variants_fork_where_they_first_differ(setup):
    model, _, _ = setup
    variants = {k: v for k, v in _variants().items() if v is not None}
    configs = [{}] + [{n: (v.get(n) if isinstance(v, dict) else None) or NF4 for n in v} for v in variants.values()]
    forks = dict(zip(["16-bit run", *variants], PrefixRuns(model, configs).forks, strict=True))
    assert forks["all"] == Fork(0, 0)
    assert forks["late"] == Fork(0, 2)
    assert forks["later"] == Fork(2, 3)  # continues "late" (run 2), which computed layer 2 itself
    assert forks["same"] == Fork(2, LAYERS)  # identical: only the final norm and lm_head run again
    assert forks["last"] == Fork(0, 3)
    assert forks["head"].layer == 0
    assert forks["menu"].layer == 0


def test_kept_outputs_are_the_fork_points_still_needed(setup):
    """Memory: after each run only the layer outputs a later run forks from are kept, one tokens × hidden each."""
    model, _, _ = setup
    variants = {k: v for k, v in _variants().items() if v is not None}
    configs = [{}] + [{n: (v.get(n) if isinstance(v, dict) else None) or NF4 for n in v} for v in variants.values()]
    runs = PrefixRuns(model, configs)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    most = 0
    for batch in range(2):
        runs.new_batch()
        for i in range(len(configs)):
            with torch.inference_mode():
                runs.run(i, lambda: model(input_ids=ids).logits)
            needed = {(f.parent, f.layer - 1) for f in runs.forks[i + 1:] if f.layer and f.parent <= i}
            assert set(runs.kept) == needed, (batch, i)
            assert all(tuple(out.shape) == (2, 24, model.config.hidden_size) for out in runs.kept.values())
            most = max(most, len(runs.kept))
        assert not runs.kept  # the last run needed nothing more
    assert most == 3  # after "late": layer 2 for "last" (from the 16-bit run), layers 2 and 3 of "late" itself
    assert len({(f.parent, f.layer) for f in runs.forks if f.layer}) == 4  # fewer than every fork point at once
    with pytest.raises(RuntimeError, match="run the variants in order"):
        runs.new_batch()
        runs.run(2, lambda: model(input_ids=ids).logits)  # before the 16-bit run it continues
    assert all(not layer._forward_hooks and "forward" not in vars(layer) for layer in model.model.layers)


def test_kls_equal_whole_forwards(setup):
    model, reference, cache = setup
    variants = _variants()
    measured = InMemoryKLs(reference, cache)(variants)
    assert measured.tokens == sum(batch_tokens(b) for b in reference.batches()) < 6 * 24
    for label, names in variants.items():
        expected = _plain_kld(model, reference, cache, names)
        assert measured.kld[label] == pytest.approx(expected, rel=1e-5, abs=1e-9), label
    assert measured.kld["16-bit"] == 0.0
    assert measured.kld["same"] == measured.kld["late"] and measured.kld["all"] > measured.kld["late"] > 0
    assert not cache._originals  # the 16-bit weights are back, and no layer's forward is left replaced
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_report_comparisons_equal_whole_forwards(setup):
    model, reference, cache = setup
    variants = {k: v for k, v in _variants().items() if not isinstance(v, dict)}
    measured = measure_variants(reference, cache, variants)
    for label, names in variants.items():
        expected = []
        for _batch, logits16, logits in whole_forwards(model, reference, cache, names):
            logp, logq = torch.log_softmax(logits16.float(), -1), torch.log_softmax(logits.float(), -1)
            expected.append((logp.exp() * (logp - logq)).sum(-1).flatten())
        assert torch.allclose(torch.from_numpy(measured[label].kld).float(), torch.cat(expected),
                              rtol=1e-5, atol=1e-7), label
