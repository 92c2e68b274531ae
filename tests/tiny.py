"""Tiny random-init models for fast tests (dimensions multiples of 64 so bitsandbytes takes them)."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quantplan.analysis.calibration import DEFAULT_TEXT, HELDOUT_TEXT, CalibrationSet


def tiny_llama(layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 256,
               tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """A random-init Llama small enough to analyze in well under a second."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def word_tokenizer(vocab: int = 256) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over words w0..w{vocab-1} (unknown words -> w3)."""
    table = {f"w{i}": i for i in range(vocab)}
    tokenizer = Tokenizer(models.WordLevel(table, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="w2", unk_token="w3", pad_token="w0",
                                   bos_token="w1")


def save_tiny(folder: Path, **kwargs) -> Path:
    """Save a tiny Llama plus tokenizer as a from_pretrained folder."""
    vocab = kwargs.get("vocab", 256)
    tiny_llama(**kwargs).save_pretrained(folder)
    word_tokenizer(vocab).save_pretrained(folder)
    return folder


def random_calibration(samples: int = 8, seq_len: int = 32, vocab: int = 256, seed: int = 0) -> CalibrationSet:
    """Random token windows (ids >= 3, so no special tokens)."""
    ids = torch.randint(3, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, f"random-{seed}", seed)


#: special tokens of :func:`save_tiny_english`'s tokenizer
ENGLISH_SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}


def save_tiny_english(folder: Path, layers: int = 4, vocab: int = 256, seed: int = 0) -> Path:
    """Save a tiny Llama plus a fast tokenizer over the shipped English text's most frequent words.

    English calibration and held-out windows then become varied token ids (not all unknown), which
    the reports, notebook and benchmark smoke tests need; returns ``folder``.
    """
    model = tiny_llama(layers=layers, vocab=vocab, seed=seed)
    model.generation_config.max_length = None
    model.save_pretrained(folder)
    words = collections.Counter()
    for path in (DEFAULT_TEXT, HELDOUT_TEXT):
        words.update(re.findall(r"\w+|[^\w\s]", path.read_text()[:200_000].lower()))
    table = dict(ENGLISH_SPECIALS)
    for word, _ in words.most_common(vocab - len(ENGLISH_SPECIALS)):
        table[word] = len(table)
    tokenizer = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return Path(folder)



#: a Gemma-3-sized vocabulary: the 16-bit logits of one token take 0.5 MB
LARGE_VOCAB = 262_144


def large_vocab_llama(vocab: int = LARGE_VOCAB) -> LlamaForCausalLM:
    """A 2-layer, hidden-64 Llama with a ≥ 256k vocabulary: memory there is logits, not weights."""
    return tiny_llama(layers=2, hidden=64, intermediate=128, vocab=vocab)


class PaddedCalibration:
    """Random windows whose last positions are padding in every other row (an attention mask with zeros)."""

    def __init__(self, samples: int = 6, seq_len: int = 24, vocab: int = 256, seed: int = 3):
        self.ids = torch.randint(3, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(seed))
        self.mask = torch.ones_like(self.ids)
        self.mask[::2, -5:] = 0

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self.ids) // batch_size)

    def batches(self, batch_size: int):
        for start in range(0, len(self.ids), batch_size):
            yield {"input_ids": self.ids[start:start + batch_size], "attention_mask": self.mask[start:start + batch_size]}


def whole_forwards(model, reference, cache, names):
    """Per batch of ``reference``: (batch, 16-bit logits, the variant's logits), each from one whole forward;
    ``names``: the variant's quantized modules (a dict may give each its 4-bit format, None: the cache's), or
    None for the 16-bit run itself. What the chunked and forked comparisons are checked against."""
    from quantplan.analysis.reference import forward_logits

    for batch in reference.batches():
        with torch.inference_mode():
            logits16 = forward_logits(model, batch)
            if names is None:
                yield batch, logits16, logits16
                continue
            formats = {n: f for n, f in names.items() if f is not None} if isinstance(names, dict) else {}
            cache.set_quantized(list(names), formats)  # as the comparisons round-trip: a module while it runs
            try:
                logits = forward_logits(model, batch)
            finally:
                cache.set_quantized(())
            yield batch, logits16, logits


class LabelledCalibration:
    """Calibration batches that carry ``labels`` beside the ids, as PaliGemma's processor makes them."""

    def __init__(self, calibration):
        self.inner, self.meta = calibration, calibration.meta

    def num_batches(self, batch_size):
        return self.inner.num_batches(batch_size)

    def batches(self, batch_size):
        for batch in self.inner.batches(batch_size):
            yield {**batch, "labels": batch["input_ids"].clone()}
