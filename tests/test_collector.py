"""The CLI keeps the collector off the imported libraries' objects while a command runs, and only then."""

import gc

from quantplan.common.collector import freeze_imported, thaw


def test_freeze_then_thaw_leaves_the_collector_as_it_was():
    """freeze_imported freezes what is alive (a later collection walks only newer objects); thaw gives them back."""
    assert gc.get_freeze_count() == 0
    try:
        freeze_imported()
        assert gc.get_freeze_count() > 100_000  # torch, transformers and bitsandbytes' objects at least
        assert len(gc.get_objects()) < gc.get_freeze_count()
    finally:
        thaw()
    assert gc.get_freeze_count() == 0


def test_a_freeze_made_by_the_caller_is_left_alone():
    """A caller that froze objects itself keeps its freeze: freeze_imported adds none, thaw undoes none."""
    gc.freeze()
    try:
        count = gc.get_freeze_count()
        freeze_imported()
        thaw()
        assert gc.get_freeze_count() == count
    finally:
        gc.unfreeze()


def test_a_command_run_in_process_thaws_when_it_returns(tmp_path):
    """quantplan's main (what tests and notebooks call) returns with nothing frozen, also after an error."""
    from quantplan.cli import main

    assert main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert gc.get_freeze_count() == 0
