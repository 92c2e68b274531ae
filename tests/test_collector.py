"""`quantplan run` keeps the collector off the imported libraries' objects while its stages run, and only then."""

import gc

import pytest
from tiny import save_tiny_english

from quantplan.common.collector import imports_frozen


def test_the_block_freezes_what_is_alive_and_gives_it_back():
    """Within imports_frozen a collection walks only newer objects; after it, nothing stays frozen, also after an
    error in the block."""
    assert gc.get_freeze_count() == 0
    with pytest.raises(KeyError), imports_frozen():
        assert gc.get_freeze_count() > 100_000  # torch, transformers and bitsandbytes' objects at least
        assert len(gc.get_objects()) < gc.get_freeze_count()
        raise KeyError("a stage failed")
    assert gc.get_freeze_count() == 0


def test_a_freeze_made_by_the_caller_is_left_alone():
    """A caller that froze objects itself keeps its freeze: the block adds none and undoes none."""
    gc.freeze()
    try:
        count = gc.get_freeze_count()
        with imports_frozen():
            assert gc.get_freeze_count() == count
        assert gc.get_freeze_count() == count
    finally:
        gc.unfreeze()


def test_run_freezes_for_its_stages_only(tmp_path, monkeypatch):
    """pipeline.run's stages run frozen (what makes its collections between stages cheap); it returns thawed, also
    when a stage fails."""
    import quantplan.pipeline as pipeline

    frozen = []

    def stages(*args, **kwargs):
        frozen.append(gc.get_freeze_count())
        raise RuntimeError("stopped after the check")

    monkeypatch.setattr(pipeline, "_run_stages", stages)
    with pytest.raises(RuntimeError, match="stopped"):
        pipeline.run(str(save_tiny_english(tmp_path / "model", layers=1)), "+20%", tmp_path / "job")
    assert frozen and frozen[0] > 100_000
    assert gc.get_freeze_count() == 0


def test_run_binds_its_gpu_before_the_freeze_imports_bitsandbytes(tmp_path, monkeypatch):
    """bind_local_gpu must run before bitsandbytes is imported (its import queries every CUDA device): before the
    freeze."""
    import quantplan.pipeline as pipeline

    order = []
    monkeypatch.setattr(pipeline, "bind_local_gpu", lambda device: order.append(("bind", gc.get_freeze_count())))
    monkeypatch.setattr(pipeline, "_run_stages", lambda *a, **k: order.append(("stages", gc.get_freeze_count())) or {})
    pipeline.run(str(save_tiny_english(tmp_path / "model", layers=1)), "+20%", tmp_path / "job")
    assert [step for step, _ in order] == ["bind", "stages"]
    assert order[0][1] == 0 and order[1][1] > 0
