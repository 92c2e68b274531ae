"""The 16-bit reference logits are never held for all tokens x vocabulary at once (analysis.reference).

On a tiny-hidden Llama with a 262k vocabulary every token's 16-bit logits take 0.5 MB, so keeping
a whole calibration set's logits (the former design) grows the verification's memory with the
number of batches; computing them per batch and comparing every variant while that batch is alive
does not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import LARGE_VOCAB, large_vocab_llama, random_calibration

from quantplan.analysis import NF4, analyze
from quantplan.common.profile import recording, rss_peak_bytes, stage
from quantplan.planner import plan
from quantplan.planner.verify import verify

SEQ_LEN, BATCH = 16, 1  # 16 tokens a batch: 16 MB of (float32 model) logits per batch


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


@pytest.fixture(scope="module")
def big():
    model = large_vocab_llama().float()  # float32 runs faster than bf16 on CPU
    calibration = random_calibration(samples=2 * BATCH, seq_len=SEQ_LEN, vocab=LARGE_VOCAB)
    table = analyze(model, calibration, [NF4], batch_size=BATCH, progress=False)
    return model, table


def _verification_peak(model, table, batches: int) -> int:
    """Peak resident memory of verify() over ``batches`` calibration batches, above its start."""
    calibration = random_calibration(samples=batches * BATCH, seq_len=SEQ_LEN, vocab=LARGE_VOCAB, seed=1)
    chosen = plan(table, "+1%")
    start = _rss_bytes()
    with recording() as profile, stage("verification"):
        checked = verify(table, chosen, model, calibration, batch_size=BATCH, progress=False)
    assert checked.checks.verification.tokens == batches * BATCH * SEQ_LEN
    return profile.stages[0].peak_rss_bytes - start


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable RSS high-water mark")
def test_verification_memory_does_not_grow_with_the_calibration_batches(big):
    model, table = big
    _verification_peak(model, table, 1)  # warm up the allocator and the libraries
    few = _verification_peak(model, table, 2)
    many = _verification_peak(model, table, 8)
    logits_per_batch = BATCH * SEQ_LEN * LARGE_VOCAB * 4
    # kept for every batch, 6 more batches would add 6 x 16 MB = 96 MB; computed per batch, nothing
    assert many - few < 2 * logits_per_batch, (few, many)
    assert rss_peak_bytes() > 0
