"""The in-memory comparisons apply lm_head in token chunks (analysis.head_chunks) with the numbers of whole forwards.

Where the logits are plain ``lm_head(last hidden state)``, the verification's KLs and the fidelity
scoreboard's per-token KL, same top token and NLL come from the base model's hidden states and the
head applied a few tokens at a time: they must equal those of one whole forward per batch and
variant (tied and untied heads, padding, a variant round-tripping lm_head itself in one or two
formats, a VLM), and no lm_head call may see more than a chunk of tokens. A model that changes its
logits after lm_head (Gemma-2's soft-capping) keeps whole-batch logits.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from tiny import PaddedCalibration, tiny_llama, whole_forwards
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Gemma2Config, Gemma2ForCausalLM

from quantplan.analysis import head_chunks
from quantplan.analysis.formats import NF4, NF4_BS32
from quantplan.analysis.reference import InMemoryKLs, KLReference, compare_tokens, forward_logits, kl_sum
from quantplan.analysis.simulate import QuantCache
from quantplan.reports.fidelity import measure_variants

LAYERS = 3
CHUNK = 7  # tokens per chunk: each batch of 4 x 24 positions in 14 chunks, the last one short


def _variants(model) -> dict:
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    body = [n for n in linears if n != "lm_head"]
    late = [n for n in body if f".layers.{LAYERS - 1}." in n]
    return {
        "all": linears,  # lm_head round-tripped too
        "late": late,  # forks after the 16-bit run's first layers
        "16-bit": None,
        "head": ["lm_head"],  # the base as the 16-bit run: only the head differs
        "menu": {**dict.fromkeys(body), "lm_head": NF4_BS32},  # lm_head in a second format
    }


def _assert_equal_to_whole_forwards(model, reference, variants):
    """The comparisons' numbers equal whole forwards'; returns (the KLs, the tokens of each lm_head call they made)."""
    cache = QuantCache(model, NF4)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: seen.append(args[0][..., 0].numel()))
    try:
        measured = InMemoryKLs(reference, cache)(variants)
        scored = measure_variants(reference, cache, variants)
    finally:
        hook.remove()
    for label, names in variants.items():
        total, parts = 0.0, []
        for batch, logits16, logits in whole_forwards(model, reference, cache, names):
            total += float(kl_sum(logits16, logits, batch))
            parts.append(compare_tokens(logits16, logits, batch["input_ids"]))
        for field in ("kld", "nll"):
            expected = torch.cat([getattr(p, field).flatten() for p in parts]).double()
            got = torch.from_numpy(getattr(scored[label], field))
            assert got.shape == expected.shape, (label, field)
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (label, field)
        same = torch.cat([p.same_top.flatten() for p in parts]).numpy()
        assert (scored[label].same_top == same).all(), label
        # a float32 Σ P (log P − log Q) carries ~1e-7 nats of rounding per token whatever the KL: the logits of a
        # chunk of rows and of the whole batch differ in their last bits (BLAS), which that much absolute noise shows
        assert measured.kld[label] == pytest.approx(total / reference.tokens, rel=1e-5, abs=1e-7), label
    assert not cache._originals  # the 16-bit weights are back
    return measured, seen


@pytest.mark.parametrize("piece", [None, 3], ids=["one-piece", "pieces-of-3"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_chunked_comparisons_equal_whole_forwards(tie, piece, monkeypatch):
    """Also compared in pieces of 3 rows (HeadChunk.pieces): a chunk of 7 in pieces 3 + 3 + 1, windows of 24 ending
    inside a piece and at a piece's end (the NLL's next tokens and the padding mask at their borders)."""
    monkeypatch.setattr(head_chunks, "chunk_size", lambda model: CHUNK)
    if piece:
        monkeypatch.setattr(head_chunks, "PIECE_BYTES", piece * 4 * 256)
        assert head_chunks.piece_rows(256) == piece
    model = tiny_llama(layers=LAYERS, tie=tie).float()
    reference = KLReference(model, PaddedCalibration(seed=5), batch_size=4)
    measured, seen = _assert_equal_to_whole_forwards(model, reference, _variants(model))
    assert seen and max(seen) <= CHUNK  # never a whole batch's logits, in any of the runs
    assert measured.kld["16-bit"] == 0.0 and measured.kld["head"] > 0 and measured.kld["all"] > measured.kld["late"] > 0
    assert measured.kld["menu"] != measured.kld["all"]  # lm_head's second format is the one used


def _soft_capped_gemma2(seed: int = 0) -> Gemma2ForCausalLM:
    """A tiny Gemma-2 whose logits are soft-capped after lm_head (not a plain head)."""
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0,
                          pad_token_id=0)
    return Gemma2ForCausalLM(config).float().eval()


def test_a_model_transforming_its_logits_keeps_whole_batch_logits(monkeypatch):
    monkeypatch.setattr(head_chunks, "chunk_size", lambda model: CHUNK)
    model = _soft_capped_gemma2()
    reference = KLReference(model, PaddedCalibration(seed=5), batch_size=4)
    measured, seen = _assert_equal_to_whole_forwards(model, reference, _variants(model))
    assert set(seen) == {4 * 24, 2 * 24}  # whole batches (6 windows: 4 + 2), the model's own forwards: soft-capped
    assert measured.kld["all"] > 0


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_a_vlm_compares_in_chunks_with_the_numbers_of_whole_forwards(arch, monkeypatch, tmp_path):
    """The base model of a VLM (its language model fed the image features) gives the hidden states lm_head reads."""
    from vlm_models import save_tiny_vlm

    from quantplan.analysis import load_model, load_processor, resolve_source
    from quantplan.analysis.vision import load_image_calibration

    monkeypatch.setattr(head_chunks, "chunk_size", lambda model: CHUNK)
    source = resolve_source(str(save_tiny_vlm(arch, tmp_path / arch)))
    model = load_model(source).float()
    calibration = load_image_calibration(load_processor(source), "default", samples=2)
    reference = KLReference(model, calibration, batch_size=2)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    variants = {"16-bit": None, "language": [n for n in names if "language_model" in n or n == "lm_head"],
                "vision": [n for n in names if "language_model" not in n and n != "lm_head"]}
    measured, seen = _assert_equal_to_whole_forwards(model, reference, variants)
    assert seen and max(seen) <= CHUNK
    assert measured.kld["language"] > 0 and measured.kld["vision"] > 0


def test_another_model_compares_in_chunks_with_the_numbers_of_whole_forwards(monkeypatch):
    """fidelity.measure (a real bitsandbytes load beside the 16-bit model) and model_kld chunk both heads."""
    from quantplan.analysis.reference import model_kld
    from quantplan.reports.fidelity import fidelity_of_self, measure

    monkeypatch.setattr(head_chunks, "chunk_size", lambda model: CHUNK)
    model16, other = tiny_llama(layers=LAYERS).float(), tiny_llama(layers=LAYERS).float()
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.1)
        other.lm_head.weight.add_(0.01 * torch.randn_like(other.lm_head.weight))
    reference = KLReference(model16, PaddedCalibration(seed=5), batch_size=4)
    seen = []
    for model in (model16, other):
        model.lm_head.register_forward_hook(lambda module, args, output: seen.append(args[0][..., 0].numel()))
    got, own, kld = measure(other, reference), fidelity_of_self(reference), model_kld(other, reference)
    assert seen and max(seen) <= CHUNK
    with torch.inference_mode():
        pairs = [(b, forward_logits(model16, b), forward_logits(other, b)) for b in reference.batches()]
    parts = [compare_tokens(p, q, b["input_ids"]) for b, p, q in pairs]
    for field in ("kld", "nll"):
        expected = torch.cat([getattr(p, field).flatten() for p in parts]).double()
        assert torch.allclose(torch.from_numpy(getattr(got, field)), expected, rtol=1e-4, atol=1e-6), field
    assert (got.same_top == torch.cat([p.same_top.flatten() for p in parts]).numpy()).all()
    whole = sum(float(kl_sum(p, q, b)) for b, p, q in pairs) / reference.tokens
    assert kld == pytest.approx(whole, rel=1e-5, abs=1e-7) and kld > 0
    own_nll = torch.cat([compare_tokens(p, p, b["input_ids"]).nll.flatten() for b, p, _ in pairs]).double()
    assert (own.kld == 0).all() and torch.allclose(torch.from_numpy(own.nll), own_nll, rtol=1e-5, atol=1e-6)


def _base_forwards(model) -> list:
    """One entry per forward of ``model``'s base model (what :func:`head_chunks.base_hidden` runs) from now on."""
    seen = []
    getattr(model, model.base_model_prefix).register_forward_hook(lambda module, args, output: seen.append(1))
    return seen


def _same_fidelity(got, expected) -> None:
    for field in ("kld", "same_top", "nll"):
        assert np.array_equal(getattr(got, field), getattr(expected, field)), field


def test_a_model_compared_after_the_variants_reads_their_16_bit_hidden_states(monkeypatch):
    """The scoreboard's bitsandbytes rows (fidelity.measure after measure_variants on the same reference) take the
    16-bit run's last hidden states the variants' pass kept: no 16-bit base forward again, the same numbers bit for
    bit as a fresh reference's, and the 16-bit row's own numbers from them too."""
    from quantplan.reports.fidelity import fidelity_of_self, measure

    monkeypatch.setattr(head_chunks, "chunk_size", lambda model: CHUNK)
    model16, other = tiny_llama(layers=LAYERS).float(), tiny_llama(layers=LAYERS, seed=1).float()
    variants = _variants(model16)  # round trips before and after the 16-bit run, one forking from its layers
    shared = KLReference(model16, PaddedCalibration(seed=5), batch_size=4)
    scored = measure_variants(shared, QuantCache(model16, NF4), variants)
    forwards = _base_forwards(model16)
    got, own = measure(other, shared), fidelity_of_self(shared)
    assert not forwards  # every batch's 16-bit hidden states kept by the variants' 16-bit run
    fresh = KLReference(model16, shared.calibration, batch_size=4)
    expected = measure(other, fresh)
    assert len(forwards) == fresh.count == 2  # a fresh reference runs the 16-bit base model once per batch ...
    _same_fidelity(got, expected)
    _same_fidelity(fidelity_of_self(fresh), own)
    assert len(forwards) == 2  # ... and keeps what it ran
    _same_fidelity(own, scored["16-bit"])
    assert got.kld.mean() > 0


def test_a_soft_capped_model_compared_after_the_variants_runs_its_16_bit_forwards(monkeypatch):
    """Where the logits are transformed after lm_head (Gemma-2's soft-capping) every comparison is a whole forward:
    fidelity.measure after measure_variants runs the 16-bit model per batch and gives a fresh reference's numbers."""
    from quantplan.reports.fidelity import measure

    monkeypatch.setattr(head_chunks, "chunk_size", lambda model: CHUNK)
    model16, other = _soft_capped_gemma2(), _soft_capped_gemma2(seed=1)
    shared = KLReference(model16, PaddedCalibration(seed=5), batch_size=4)
    measure_variants(shared, QuantCache(model16, NF4), _variants(model16))
    forwards = _base_forwards(model16)
    got = measure(other, shared)
    assert len(forwards) == shared.count == 2  # the 16-bit model's own forward on every batch
    _same_fidelity(got, measure(other, KLReference(model16, shared.calibration, batch_size=4)))
    with torch.inference_mode():
        parts = [compare_tokens(forward_logits(model16, b), forward_logits(other, b), b["input_ids"])
                 for b in shared.batches()]
    expected = torch.cat([p.kld.flatten() for p in parts]).double()
    assert torch.allclose(torch.from_numpy(got.kld), expected, rtol=1e-4, atol=1e-6) and got.kld.mean() > 0


@pytest.mark.parametrize("progress", [True, False])
def test_comparing_another_model_shows_a_progress_bar_when_asked(progress, capsys):
    """model_kld / fidelity.measure walk the batches with a bar when the reference has ``progress`` (a long
    scoreboard row must not look hung), and print nothing otherwise."""
    from quantplan.analysis.reference import model_kld

    model16, other = tiny_llama(layers=1).float(), tiny_llama(layers=1).float()
    model_kld(other, KLReference(model16, PaddedCalibration(seed=5), batch_size=4, progress=progress))
    err = capsys.readouterr().err
    assert ("model vs 16-bit" in err) is progress


class _LiveLogits(TorchDispatchMode):
    """Tensors that ops make: how many of them are alive at most (``most_alive``); of those over the vocabulary (last
    dimension ``vocab``, not lm_head's weight shape) how many were made (``made``) and their bytes alive at once at
    most (``peak``, with the shapes alive then)."""

    def __init__(self, vocab: int, weight_shape: tuple):
        super().__init__()
        self.vocab, self.weight_shape, self.live, self.peak, self.shapes, self._alive = vocab, weight_shape, 0, 0, [], {}
        self.made, self.alive, self.most_alive = 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for tensor in (t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)):
            self.alive += 1
            self.most_alive = max(self.most_alive, self.alive)
            weakref.finalize(tensor, self._dropped)
        if (isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[-1] == self.vocab
                and tuple(out.shape) != self.weight_shape and out.untyped_storage().data_ptr() not in inputs):
            size = out.numel() * out.element_size()
            self.made += 1
            self.live += size
            self._alive[id(out)] = tuple(out.shape)
            weakref.finalize(out, self._freed, id(out), size)
            if self.live > self.peak:
                self.peak, self.shapes = self.live, list(self._alive.values())
        return out

    def _dropped(self):
        self.alive -= 1

    def _freed(self, key, size):
        self.live -= size
        self._alive.pop(key, None)


def _scoreboard_pass(model, windows: int, seq_len: int) -> tuple[dict, _LiveLogits]:
    from tiny import LARGE_VOCAB, random_calibration

    reference = KLReference(model, random_calibration(samples=windows, seq_len=seq_len, vocab=LARGE_VOCAB), batch_size=2)
    body = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    variants = {"16-bit": None, "body": body, "late": [n for n in body if ".layers.1." in n], "all": [*body, "lm_head"]}
    tracker = _LiveLogits(LARGE_VOCAB, tuple(model.lm_head.weight.shape))
    with tracker:
        scored = measure_variants(reference, QuantCache(model, NF4), variants)
    assert len(scored["all"].kld) == windows * seq_len and scored["all"].kld.mean() > scored["late"].kld.mean() > 0
    return scored, tracker


def test_the_scoreboard_holds_a_few_chunks_of_logits_at_a_time(monkeypatch):
    """measure_variants on a 262k vocabulary: at most the 16-bit chunk's logits, log-probabilities and probabilities,
    one variant's logits and log-probabilities and one temporary (the KL's difference) alive at once, never a whole
    batch's logits (4 chunks here); no other rows × vocabulary temporary made per comparison (the KL's product, the
    NLL's copy of the rows that have a next token); and no tensor kept per chunk to the end of the pass (each
    chunk's small results). Such temporaries and kept tensors made glibc's malloc keep freed memory: each small
    tensor kept took space a temporary had freed, so the next temporary took new memory (the 262k model's
    scoreboard held 0.6 GiB more at its peak, one with SmolLM2's vocabulary 1.3 GiB more)."""
    from tiny import LARGE_VOCAB, large_vocab_llama

    chunk, seq_len = 4, 16
    monkeypatch.setattr(head_chunks, "chunk_size", lambda model: chunk)
    model = large_vocab_llama().float()
    _, one = _scoreboard_pass(model, 2, seq_len)  # one batch of 2 windows
    scored, two = _scoreboard_pass(model, 4, seq_len)  # two batches
    copy = chunk * LARGE_VOCAB * 4
    assert two.peak <= 6 * copy, (two.peak / copy, two.shapes)
    # per chunk of tokens: the 16-bit logits and each variant's; per piece of it (head_chunks.piece_rows) the 16-bit
    # log-probabilities, probabilities and its own row's KL difference, then per variant its log-probabilities and
    # KL difference
    pieces = -(-chunk // head_chunks.piece_rows(LARGE_VOCAB))
    assert pieces > 1
    assert two.made <= 4 * seq_len // chunk * (4 + pieces * (3 + 3 * 2)), two.made
    # twice the chunks, about as many tensors alive at once (3 results x 4 variants x 8 chunks = 96 more if each
    # chunk's were kept)
    assert two.most_alive - one.most_alive < 48, (one.most_alive, two.most_alive)


def test_a_quantized_head_is_restored_once_per_format_and_batch(monkeypatch):
    """Several variants round-trip lm_head in one format: its de-quantized weight is made once a batch for them all."""
    monkeypatch.setattr(head_chunks, "chunk_size", lambda model: CHUNK)
    model = tiny_llama(layers=LAYERS).float()
    reference = KLReference(model, PaddedCalibration(seed=5), batch_size=4)
    cache = QuantCache(model, NF4)
    calls = []
    restored = cache.restored
    monkeypatch.setattr(cache, "restored", lambda name, fmt=None: calls.append((name, fmt)) or restored(name, fmt))
    variants = _variants(model)
    variants["head, again"] = ["lm_head"]  # a third variant with lm_head in the cache's format
    InMemoryKLs(reference, cache)(variants)
    heads = [fmt for name, fmt in calls if name == "lm_head"]
    assert len(heads) == 2 * reference.count  # NF4 (three variants) and NF4_BS32 (one), each once a batch


def test_a_kl_sum_with_gradients_is_taken_in_one_piece(monkeypatch):
    """HeadChunk.kl_sum of logits that need gradients (the refinement's head_kl_gradient) is not taken in pieces: each
    slice's backward would add a gradient the size of the whole chunk. The value equals the pieces' sum without
    gradients, the gradient that of reference.kl_sum."""
    monkeypatch.setattr(head_chunks, "PIECE_BYTES", 2 * 4 * 256)  # pieces of 2 rows
    torch.manual_seed(0)
    logits16, logits = torch.randn(7, 256), torch.randn(7, 256)
    batch = {"input_ids": torch.randint(0, 256, (1, 7)), "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0]])}
    chunk = head_chunks.HeadChunk("x", 0, batch, slice(0, 7), (1, 7), logits16, logits)
    pieced = chunk.kl_sum()
    assert len(list(chunk.pieces())) == 4
    monkeypatch.setattr(head_chunks.HeadChunk, "pieces", lambda self: pytest.fail("pieces with gradients"))
    leaf = logits.clone().requires_grad_()
    whole = head_chunks.HeadChunk("x", 0, batch, slice(0, 7), (1, 7), logits16, leaf).kl_sum()
    whole.backward()
    expected_leaf = logits.clone().requires_grad_()
    kl_sum(logits16, expected_leaf, batch).backward()
    assert whole.item() == pytest.approx(pieced.item(), rel=1e-6)
    assert torch.allclose(leaf.grad, expected_leaf.grad)


def test_an_empty_chunk_compares_to_nothing():
    """A chunk of no rows (a slice past a batch's end) gives empty results and a zero KL sum, in pieces or not."""
    logits16, logits = torch.randn(0, 256), torch.randn(0, 256)
    chunk = head_chunks.HeadChunk("x", 0, {"input_ids": torch.randint(0, 256, (1, 8))}, slice(8, 8), (1, 8), logits16,
                                  logits)
    compared = chunk.compare()
    assert compared.kld.numel() == compared.same_top.numel() == compared.nll.numel() == 0
    assert chunk.kl_sum().item() == 0.0
