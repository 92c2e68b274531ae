"""Calibrating on one's own fine-tune data: chat records (a ``messages`` column) through the chat template."""

from __future__ import annotations

import json

import pytest
from tiny import save_tiny, word_tokenizer

from quantplan.analysis import SensitivityTable, load_calibration
from quantplan.analysis.calibration import load_texts

#: user turns open with w40, assistant turns with w41, every turn ends with EOS (w2); words are w50..w99
#: (no word may start with a special token's text, w0..w3: the tokenizer would split it there)
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}w40{% else %}w41{% endif %} "
            "{{ m['content'] }} w2 {% endfor %}")


def chat_tokenizer():
    tokenizer = word_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write_chats(path, records: int = 40) -> str:
    chats = [{"messages": [{"role": "user", "content": " ".join(f"w{(i * 7 + j) % 50 + 50}" for j in range(12))},
                           {"role": "assistant", "content": " ".join(f"w{(i * 5 + j) % 50 + 50}" for j in range(12))}],
              "id": i} for i in range(records)]
    path.write_text("\n".join(json.dumps(c) for c in chats))
    return str(path)


def test_chat_records_go_through_the_chat_template(tmp_path):
    chats = write_chats(tmp_path / "chats.jsonl")
    texts = load_texts(chats, chat_tokenizer())
    assert len(texts) == 40 and all(t.startswith("w40 ") and " w2 w41 " in t for t in texts)
    ids = load_calibration(chat_tokenizer(), chats, samples=4, seq_len=32).input_ids
    assert (ids == 40).any() and (ids == 41).any()  # the template's role markers reached the tokens


def test_chat_records_without_a_template_or_with_bad_messages(tmp_path):
    chats = write_chats(tmp_path / "chats.jsonl")
    with pytest.raises(ValueError, match="holds chats.*no chat template.*'text' column"):
        load_texts(chats, word_tokenizer())
    with pytest.raises(ValueError, match="holds chats"):
        load_texts(chats)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": 3}]}))
    with pytest.raises(ValueError, match=r"record 0: 'messages' must be a list of"):
        load_texts(str(tmp_path / "bad.jsonl"), chat_tokenizer())


def test_cli_run_calibrates_on_chats(tmp_path):
    from quantplan.cli import main

    folder = save_tiny(tmp_path / "model")
    chat_tokenizer().save_pretrained(folder)  # the model folder holds its chat template
    chats = write_chats(tmp_path / "chats.jsonl")
    out = tmp_path / "job"
    code = main(["run", str(folder), "--calib", chats, "--samples", "4", "--seq-len", "32", "--budget", "+20%",
                 "--no-compare", "--quiet", "--out", str(out)])
    assert code == 0
    meta = SensitivityTable.load(out).meta
    expected = load_calibration(chat_tokenizer(), chats, samples=4, seq_len=32)
    assert meta["calibration_fingerprint"] == expected.fingerprint
    assert (expected.input_ids == 40).any()  # what the table was measured on went through the template
    assert (out / "checkpoint" / "config.json").is_file()
