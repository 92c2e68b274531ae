"""A tiny random-init model saved with a word-level tokenizer, for the reports and notebook tests.

The tokenizer's vocabulary is the most frequent words of the shipped calibration and held-out
text, so English held-out windows become varied token ids (not all unknown).
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

from quantplan.analysis.calibration import DEFAULT_TEXT, HELDOUT_TEXT
from tiny import tiny_llama

SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}


def save_tiny_model(folder: Path, layers: int = 4, vocab: int = 256, seed: int = 0) -> Path:
    """Save a tiny Llama plus a matching fast tokenizer into ``folder``; returns ``folder``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama(layers=layers, vocab=vocab, seed=seed)
    model.generation_config.max_length = None
    model.save_pretrained(folder)
    words = collections.Counter()
    for path in (DEFAULT_TEXT, HELDOUT_TEXT):
        words.update(re.findall(r"\w+|[^\w\s]", path.read_text()[:200_000].lower()))
    table = dict(SPECIALS)
    for word, _ in words.most_common(vocab - len(SPECIALS)):
        table[word] = len(table)
    tokenizer = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return Path(folder)


def test_tiny_tokenizer_reads_english(tmp_path):
    from transformers import AutoTokenizer

    folder = save_tiny_model(tmp_path / "tiny")
    ids = AutoTokenizer.from_pretrained(folder)("It is not what you say, it is what you do.")["input_ids"]
    assert len(ids) >= 10 and sum(i == SPECIALS["<unk>"] for i in ids) < len(ids) // 2


def tiny_job(folder: Path, budgets=("+10%", "+33%")):
    """A saved tiny model, its sensitivity table (in ``folder/out``) and plans at ``budgets``."""
    from quantplan.analysis import NF4, analyze, load_calibration, load_model, load_processor, resolve_source
    from quantplan.planner import plan

    source = resolve_source(str(save_tiny_model(folder / "model")))
    calibration = load_calibration(load_processor(source), samples=8, seq_len=64)
    table = analyze(load_model(source), calibration, [NF4], model_id=source.model_id,
                    model_fingerprint=source.fingerprint, out_dir=folder / "out", progress=False)
    plans = [plan(table, b) for b in budgets]
    for p in plans:
        p.save(folder / "out" / f"plan{p.budget.spec.strip('+%')}.json")
    return source, table, plans
