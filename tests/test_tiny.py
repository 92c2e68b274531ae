"""The tiny test models themselves (tests/tiny.py) behave as the other tests assume."""

from __future__ import annotations

from tiny import ENGLISH_SPECIALS, save_tiny_english


def test_tiny_tokenizer_reads_english(tmp_path):
    from transformers import AutoTokenizer

    folder = save_tiny_english(tmp_path / "tiny")
    ids = AutoTokenizer.from_pretrained(folder)("It is not what you say, it is what you do.")["input_ids"]
    assert len(ids) >= 10 and sum(i == ENGLISH_SPECIALS["<unk>"] for i in ids) < len(ids) // 2
