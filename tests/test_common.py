"""quantplan.common: size parsing, atomic writes, moving batches (the leaf helpers every room uses)."""

from __future__ import annotations

import pytest
import torch

from quantplan.common.batches import batch_to, model_device
from quantplan.common.files import atomic_write_bytes, atomic_write_text, staged_file, staged_folder
from quantplan.common.sizes import cap_above, format_bytes, parse_size, read_size
from quantplan.planner.budget import BudgetError, parse_budget


@pytest.mark.parametrize(("text", "expected"), [
    ("123456", 123456), ("2GB", 2 * 10**9), ("1.8 gb", 1_800_000_000), ("1500MiB", 1500 * 2**20),
    ("0.5KiB", 512), ("3tb", 3 * 10**12), (" 7 b ", 7), (".25GiB", 2**28),
])
def test_sizes_parse_units(text, expected):
    assert parse_size(text) == expected
    assert parse_budget(text).resolve(0, 0) == expected  # budgets read absolute sizes the same way


def test_sizes_round_trip_through_format_bytes():
    for n in (12_345, 4_200_000, 1_800_000_000, 5 * 10**12):
        text = format_bytes(n)
        assert parse_size(text) == pytest.approx(n, rel=5e-3), text


def test_a_suggested_cap_reads_back_above_the_need():
    """cap_above names a --max-memory a user can type that covers the need, in GB from 1 GB up, else whole MB (a need
    of a few MB is not written 0.01GB)."""
    for need in (1, 999_999, 3_420_000, 113_450_000, 999_999_999, 10**9, 1_234_567_890, 7 * 10**11):
        text = cap_above(need)
        assert need < parse_size(text) <= need + 2 * 10**7, text
        assert text.endswith("GB" if need >= 10**9 else "MB") and " " not in text
    assert cap_above(3_420_000) == "4MB" and cap_above(1_234_567_890) == "1.24GB"


def test_sizes_errors_keep_their_wording():
    for bad in ("2 gigabytes", "GB", "-1GB", "1.8GBB", ""):
        assert read_size(bad) is None
        with pytest.raises(ValueError, match=r"cannot read memory size .*: write e.g. 2GB, 1500MiB or a byte count"):
            parse_size(bad)
    with pytest.raises(BudgetError, match=r"cannot read budget '2 gigabytes': write an absolute size"):
        parse_budget("2 gigabytes")
    assert parse_size(3.9) == 3 and parse_size(10) == 10


def test_atomic_writes_replace_whole_files(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    atomic_write_bytes(tmp_path / "blob", b"\x00\x01")
    assert path.read_text() == "new" and (tmp_path / "blob").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "state.json"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "rows.json"
    atomic_write_text(path, "kept")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # fails inside the write
    assert path.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]


def test_staged_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "models" / "converted"
    with pytest.raises(RuntimeError):
        with staged_folder(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with staged_folder(target) as tmp:
        (tmp / "config.json").write_text("first")
    with staged_folder(target) as tmp:  # another writer finishing later: the first folder stays
        (tmp / "config.json").write_text("second")
    assert (target / "config.json").read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["converted"]


def test_batch_to_moves_tensors_only():
    model = torch.nn.Linear(2, 2)
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "flag": True, "none": None}
    moved = batch_to(batch, torch.device("meta"))
    assert moved["input_ids"].device.type == "meta" and moved["flag"] is True and moved["none"] is None
    assert batch["input_ids"].device.type == "cpu"  # the caller's batch is left as it was
    assert model_device(model) == torch.device("cpu")
