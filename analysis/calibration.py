"""Calibration text: where it comes from, how it is sampled and packed into token windows.

Sources, all read through ``datasets``: the set shipped in this package (default), a hub
dataset (``NAME[:CONFIG][@SPLIT]``), or local ``.txt`` (records = paragraphs), ``.json``,
``.jsonl``, ``.csv`` and ``.parquet`` files (the ``text`` column, or the first string column).
Chat records (a ``messages`` column: lists of ``{role, content}``, as fine-tuning sets hold them)
are rendered by the tokenizer's chat template, so calibration sees the model's own chat format.
Records are shuffled with a seed, tokenized, joined with the EOS token and cut into
``seq_len`` windows, so the same source, seed and tokenizer always give the same tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_TEXT = DATA_DIR / "text" / "calibration.txt"
HELDOUT_TEXT = DATA_DIR / "text" / "heldout.txt"
CHAT_COLUMN = "messages"
_LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class CalibrationSet:
    """Packed token windows plus a fingerprint that identifies exactly these tokens."""

    input_ids: torch.Tensor  # [samples, seq_len], int64
    source: str
    seed: int

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()[:16]

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def meta(self) -> dict:
        samples, seq_len = self.input_ids.shape
        return {"source": self.source, "fingerprint": self.fingerprint, "samples": samples,
                "seq_len": seq_len, "seed": self.seed, "tokens": self.tokens}

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self.input_ids) // batch_size)

    def batch_windows(self, batch_size: int) -> list[int]:
        """The windows in each batch :meth:`batches` makes (the last one may be short)."""
        return [len(self.input_ids[start:start + batch_size]) for start in range(0, len(self.input_ids), batch_size)]

    def batches(self, batch_size: int):
        """Model keyword arguments for consecutive [batch, seq_len] slices, always in the same order."""
        for start in range(0, len(self.input_ids), batch_size):
            yield {"input_ids": self.input_ids[start : start + batch_size]}


def load_texts(source: str | None = None, tokenizer=None) -> list[str]:
    """Non-empty text records from a calibration source (see module docstring).

    ``tokenizer`` renders chat records (a ``messages`` column) with its chat template.
    """
    import datasets

    datasets.disable_progress_bars()
    if source is None or source == "default":
        dataset = datasets.load_dataset("text", data_files=str(DEFAULT_TEXT), sample_by="paragraph", split="train")
    elif source == "heldout":
        dataset = datasets.load_dataset("text", data_files=str(HELDOUT_TEXT), sample_by="paragraph", split="train")
    else:
        dataset = _load_source(source)
    if CHAT_COLUMN in dataset.column_names:
        texts = chat_texts(dataset[CHAT_COLUMN], tokenizer, source)
    else:
        column = _text_column(dataset, source)
        texts = [t.strip() for t in dataset[column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"calibration source {source!r} holds no text: pass files with a 'text' column or plain text")
    return texts


def chat_texts(conversations, tokenizer, source: str | None = None) -> list[str]:
    """Each conversation (a list of ``{role, content}``) rendered by the tokenizer's chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"calibration source {source!r} holds chats (a '{CHAT_COLUMN}' column), but the model's "
                         "tokenizer has no chat template to render them: pass records with a 'text' column, or a "
                         "model folder that holds its chat template (chat_template.jinja)")
    texts = []
    for index, messages in enumerate(conversations):
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError(f"calibration source {source!r}, record {index}: '{CHAT_COLUMN}' must be a list of "
                             "{\"role\": ..., \"content\": \"text\"} messages")
        turns = [{k: v for k, v in m.items() if v is not None} for m in messages]  # datasets fills absent keys
        if turns:
            texts.append(tokenizer.apply_chat_template(turns, tokenize=False))
    return [t for t in texts if t.strip()]


def pack_calibration(
    texts: list[str], tokenizer, samples: int, seq_len: int, seed: int = 0, source: str = "default",
    max_positions: int | None = None,
) -> CalibrationSet:
    """Shuffle records (seeded), tokenize, join with EOS and cut ``samples`` windows of ``seq_len``."""
    if samples < 1 or seq_len < 2:
        raise ValueError(f"--samples must be >= 1 and --seq-len >= 2 (got {samples}, {seq_len})")
    if max_positions and seq_len > max_positions:
        raise ValueError(
            f"--seq-len {seq_len} is beyond the model's limit of {max_positions} positions: "
            f"pass --seq-len {min(max_positions, 512)} or less"
        )
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    needed = samples * seq_len
    stream: list[int] = []
    for index in order:
        stream.extend(tokenizer(texts[index], add_special_tokens=False)["input_ids"])
        stream.append(eos)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise ValueError(
            f"calibration source {source!r} has only {len(stream)} tokens but --samples {samples} x "
            f"--seq-len {seq_len} needs {needed}: lower --samples/--seq-len or pass more text with --calib"
        )
    ids = torch.tensor(stream[:needed], dtype=torch.long).view(samples, seq_len)
    return CalibrationSet(ids, source, seed)


def load_calibration(tokenizer, source: str | None = None, samples: int = 32, seq_len: int = 512,
                     seed: int = 0, max_positions: int | None = None) -> CalibrationSet:
    """Read, sample and pack a calibration source in one call."""
    texts = load_texts(source, tokenizer)
    return pack_calibration(texts, tokenizer, samples, seq_len, seed, source or "default", max_positions)


def _load_source(source: str):
    import datasets

    path = Path(source).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_BUILDERS) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"{source} holds no .txt/.json/.jsonl/.csv/.parquet file to calibrate on")
        suffixes = {f.suffix for f in files}
        builder = {_LOCAL_BUILDERS.get(s) for s in suffixes}
        if None in builder or len(builder) != 1:
            raise ValueError(
                f"cannot read {source} as calibration text: use one kind of .txt, .json, .jsonl, .csv or .parquet files"
            )
        kind = builder.pop()
        extra = {"sample_by": "paragraph"} if kind == "text" else {}
        try:
            return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", **extra)
        except Exception as err:  # datasets reports empty or malformed files in many ways
            raise ValueError(
                f"calibration source {source!r} holds no text that datasets can read ({err}): "
                "pass non-empty .txt/.json/.jsonl/.csv/.parquet files with a 'text' column"
            ) from None
    name, _, split = source.partition("@")
    name, _, config = name.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as err:
        raise ValueError(
            f"cannot load calibration source {source!r} ({type(err).__name__}: {err}). Pass a local file "
            f"or folder, a hub dataset as NAME[:CONFIG][@SPLIT], or omit --calib for the shipped set"
        ) from None


def _text_column(dataset, source) -> str:
    if "text" in dataset.column_names:
        return "text"
    for name, feature in dataset.features.items():
        if getattr(feature, "dtype", None) == "string":
            return name
    raise ValueError(f"calibration source {source!r} has no text column (columns: {dataset.column_names})")
