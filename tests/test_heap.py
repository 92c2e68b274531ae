"""quantplan.common.heap: freed heap pages go back to the operating system when a loop's heap has grown."""

from __future__ import annotations

from quantplan.common import heap


def test_a_loop_trims_only_after_its_resident_set_grew_by_the_slack(monkeypatch):
    trims, resident = [], [1000]
    monkeypatch.setattr(heap, "_malloc_trim", lambda: lambda pad: trims.append(pad))
    monkeypatch.setattr(heap, "resident_bytes", lambda: resident[0])
    monkeypatch.setattr(heap, "SLACK_BYTES", 100)
    monkeypatch.setattr(heap, "_floor", [None])
    assert not heap.release_if_grown()  # the first call sets the floor
    resident[0] = 1099
    assert not heap.release_if_grown() and trims == []
    resident[0] = 1100
    assert heap.release_if_grown() and trims == [0]
    resident[0] = 700  # after the trim: the new floor
    assert not heap.release_if_grown()
    resident[0] = 799
    assert not heap.release_if_grown() and trims == [0]
    resident[0] = 800
    assert heap.release_if_grown() and trims == [0, 0]


def test_without_glibc_nothing_is_trimmed(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert not heap.release_freed_memory() and not heap.release_if_grown()
