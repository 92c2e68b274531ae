"""Vision-language models stream too (analysis/stream_stages.py, analysis/stream_vision.py,
analysis/stream_mllama.py).

A tiny Qwen2-VL with 8 blocks per tower, calibrated on the shipped images, streamed under a cap
below a quarter of what the in-memory analysis needs, gives the in-memory table: every column,
the Fisher scores of the vision tower and the merger included (the reverse pass carries the
gradient through the splice and the vision blocks, as the in-memory backward pass does). A tiny
Mllama does the same through its two vision stacks and its cross-attention layers; LLaVA (CLIP or
Pixtral tower) and Idefics3/SmolVLM through their one stack.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from vlm_models import save_tiny_vlm

from quantplan.analysis import NF4, SensitivityTable, analyze, load_model, load_processor, resolve_source
from quantplan.analysis.estimate import estimate_peak, meta_model
from quantplan.analysis.stream_weights import StreamingUnsupported
from quantplan.analysis.streaming import analyze_streaming, streaming_need
from quantplan.analysis.vision import load_image_calibration

SAMPLES = 2
BATCH = 2


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    """(folder, image calibration, in-memory Fisher table, cap) of a tiny Qwen2-VL with 8 blocks per tower."""
    folder = save_tiny_vlm("qwen2_vl", tmp_path_factory.mktemp("vlm") / "qwen2_vl", layers=8)
    return _with_in_memory_table(folder)


def _with_in_memory_table(folder):
    """(folder, image calibration, in-memory Fisher table, a quarter of the in-memory analysis' estimated peak)."""
    source = resolve_source(str(folder))
    calibration = load_image_calibration(load_processor(source), "default", samples=SAMPLES)
    table = analyze(load_model(source), calibration, [NF4], model_fingerprint=source.fingerprint, progress=False,
                    batch_size=BATCH, fisher=True)
    in_memory = estimate_peak(meta_model(folder), [NF4], dtype_bytes=2, batch_size=BATCH, seq_len=64, fisher=True)
    return folder, calibration, table, in_memory.total // 4


def test_streamed_qwen2_vl_equals_the_in_memory_table_under_a_quarter_of_its_peak(qwen2_vl, tmp_path):
    folder, calibration, expected, cap = qwen2_vl
    need, _ = streaming_need(folder, [NF4], batch_size=BATCH, seq_len=64)
    assert need["total"] < cap  # a quarter of the in-memory analysis' estimated peak holds the largest stage
    streamed = analyze_streaming(folder, calibration, [NF4], max_memory=cap, progress=False, batch_size=BATCH,
                                 fisher=True, out_dir=tmp_path / "out")
    pd.testing.assert_frame_equal(streamed.df, expected.df, rtol=1e-5)
    fisher = streamed.df.set_index("name")["output_fisher_error"]
    assert all(math.isfinite(fisher[f"model.visual.blocks.{i}.mlp.fc2"]) for i in range(8))
    assert math.isfinite(fisher["model.visual.merger.mlp.0"]) and fisher["model.visual.merger.mlp.0"] > 0
    with pytest.raises(StreamingUnsupported, match="--max-memory .* or more"):
        analyze_streaming(folder, calibration, [NF4], max_memory=need["total"] // 10, progress=False,
                          batch_size=BATCH)


def test_cli_analyze_streams_a_vlm_with_images(qwen2_vl, tmp_path):
    from quantplan.cli import main

    folder, _, expected, cap = qwen2_vl
    out = tmp_path / "table"
    assert main(["analyze", str(folder), "--images", "default", "--samples", str(SAMPLES), "--batch-size",
                 str(BATCH), "--max-memory", str(cap), "--formats", "nf4", "--dtype", "bf16", "--out", str(out),
                 "--quiet"]) == 0
    pd.testing.assert_frame_equal(SensitivityTable.load(out).df, expected.df, rtol=1e-5)


def test_streamed_qwen2_5_vl_windowed_and_full_attention_blocks(tmp_path):
    """Qwen2.5-VL's blocks take different cu_seqlens (windows, or the whole image): each gets its own."""
    folder = save_tiny_vlm("qwen2_5_vl", tmp_path / "qwen2_5_vl", layers=2)
    _, calibration, expected, _ = _with_in_memory_table(folder)
    streamed = analyze_streaming(folder, calibration, [NF4], progress=False, batch_size=BATCH, fisher=True)
    pd.testing.assert_frame_equal(streamed.df, expected.df, rtol=1e-5)


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    """(folder, image calibration, in-memory Fisher table, cap) of a tiny Mllama with 8 local vision blocks, 2
    global ones and 8 text layers (cross-attention at 1 and 5), its cross-attention gates open."""
    folder = save_tiny_vlm("mllama", tmp_path_factory.mktemp("vlm") / "mllama", layers=8)
    model = load_model(resolve_source(str(folder)))
    for name, param in model.named_parameters():  # closed gates (tanh(0) = 0) would cut the gradient to the tower
        if "cross_attn" in name and name.endswith("_gate"):
            param.data.fill_(1.0)
    model.save_pretrained(folder)
    return _with_in_memory_table(folder)


def test_streamed_mllama_equals_the_in_memory_table_under_a_quarter_of_its_peak(mllama, tmp_path):
    """Both vision stacks, the bridge, the projector and the cross-attention layers stream; the gradient of the
    image features adds up over both cross-attention layers before it reaches the projector and the tower."""
    folder, calibration, expected, cap = mllama
    need, _ = streaming_need(folder, [NF4], batch_size=BATCH, seq_len=64)
    assert need["total"] < cap
    streamed = analyze_streaming(folder, calibration, [NF4], max_memory=cap, progress=False, batch_size=BATCH,
                                 fisher=True, out_dir=tmp_path / "out")
    pd.testing.assert_frame_equal(streamed.df, expected.df, rtol=1e-5)
    fisher = streamed.df.set_index("name")["output_fisher_error"]
    tower = "model.vision_model."
    blocks = [f"{tower}transformer.layers.{i}.mlp.fc2" for i in range(8)] + [
        f"{tower}global_transformer.layers.{i}.mlp.fc2" for i in range(2)]
    for name in [*blocks, "model.multi_modal_projector", "model.language_model.layers.1.cross_attn.k_proj"]:
        assert math.isfinite(fisher[name]) and fisher[name] > 0, name
        assert fisher[name] == pytest.approx(expected.df.set_index("name")["output_fisher_error"][name], rel=1e-4)


def test_streamed_klds_of_mllama_equal_in_memory_klds(mllama):
    """The end-to-end checks stream Mllama on the same stages: vision, projector and cross-attention variants."""
    import torch

    from quantplan.analysis.reference import KLReference, calibration_klds
    from quantplan.analysis.simulate import QuantCache
    from quantplan.analysis.stream_variants import StreamOptions, streamed_klds

    folder, calibration, _, _ = mllama
    model = load_model(resolve_source(str(folder)))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    variants = {"16-bit": None, "vision": [n for n in names if "vision_model" in n or "projector" in n],
                "cross": [n for n in names if "cross_attn" in n], "all": names}
    expected = calibration_klds(KLReference(model, calibration, BATCH), QuantCache(model, NF4), variants)
    got = streamed_klds(folder, calibration, variants, NF4, StreamOptions(batch_size=BATCH))
    for label, value in expected.items():
        assert got.kld[label] == pytest.approx(value, rel=1e-5, abs=1e-12), label
    assert got.kld["vision"] > 0 and got.kld["cross"] > 0


@pytest.mark.parametrize("arch", ["llava", "llava_pixtral", "idefics3", "smolvlm"])
def test_streamed_one_stack_towers_equal_the_in_memory_table(arch, tmp_path):
    """LLaVA's CLIP tower (its layers take the attention mask positionally), Pixtral's (2D rotary positions, one
    sequence of every image's patches) and Idefics3/SmolVLM's SigLIP (padding images dropped, a patch mask, the
    pixel-shuffle connector) stream as Qwen2-VL's: stem, each block, projector + embeddings."""
    folder = save_tiny_vlm(arch, tmp_path / arch)
    _, calibration, expected, _ = _with_in_memory_table(folder)
    streamed = analyze_streaming(folder, calibration, [NF4], progress=False, batch_size=BATCH, fisher=True)
    pd.testing.assert_frame_equal(streamed.df, expected.df, rtol=1e-5)
    fisher = streamed.df.set_index("name")["output_fisher_error"]
    projector = fisher.filter(regex=r"^model\.(multi_modal_projector|connector)\.")
    assert len(projector) and projector.gt(0).all()
    tower = fisher.filter(regex=r"^model\.vision_(tower|model)\.").dropna()
    assert len(tower) >= 12 and tower.gt(0).all()


@pytest.mark.parametrize(("arch", "layer", "emitted", "unreached"), [
    ("llava", -2, [2], [3]),  # LLaVA-1.5: block 2's output (hidden state 3), the last block feeds no loss
    ("llava", [-2, -3], [1, 2], [3]),  # four blocks: hidden states 3 and 2 concatenated, CLS dropped from each
    ("llava_pixtral", [-1, -3], [1], []),  # the last block's output beside block 1's, select strategy "full"
])
def test_streamed_llava_reading_other_vision_layers_equals_the_in_memory_table(arch, layer, emitted, unreached,
                                                                                tmp_path):
    """The projector reads the hidden states vision_feature_layer names (stream_features): the blocks whose
    outputs it reads carry them to the splice and get their gradients back; the blocks after the deepest one
    are measured (they run in memory too) and, as in memory, a Fisher score of 0: no gradient reaches them, their
    error changes no output (it was NaN, which the objective filled from the weight error, spending bytes on them)."""
    from quantplan.analysis.stream_stages import stages_of
    from quantplan.analysis.stream_weights import skeleton

    folder = save_tiny_vlm(arch, tmp_path / arch, layers=4, feature_layer=layer)
    model = skeleton(folder, torch.bfloat16)
    blocks = [s for s in stages_of(model, [], "lm_head") if s.kind.value == "vision block"]
    assert [s.index for s in blocks if s.emits] == emitted  # the test reaches the carried path
    _, calibration, expected, cap = _with_in_memory_table(folder)
    streamed = analyze_streaming(folder, calibration, [NF4], max_memory=cap, progress=False, batch_size=BATCH,
                                 fisher=True)
    pd.testing.assert_frame_equal(streamed.df, expected.df, rtol=1e-5)
    fisher = streamed.df.set_index("name")["output_fisher_error"]
    layers = "encoder.layers" if arch == "llava" else "transformer.layers"
    fc2 = "mlp.fc2" if arch == "llava" else "feed_forward.down_proj"
    for index in range(len(blocks)):
        score = fisher[f"model.vision_tower.{layers}.{index}.{fc2}"]
        assert score == 0 if index in unreached else score > 0, (index, score)
    assert fisher.filter(regex=r"^model\.multi_modal_projector\.").gt(0).all()


def test_streamed_klds_of_llava_reading_a_list_of_vision_layers_equal_in_memory_klds(tmp_path):
    """The end-to-end checks stream the same stages: a variant rounding the tower's blocks changes the hidden
    states the projector reads, carried to it as in the analysis."""
    from quantplan.analysis.reference import KLReference, calibration_klds
    from quantplan.analysis.simulate import QuantCache
    from quantplan.analysis.stream_variants import StreamOptions, streamed_klds

    folder = save_tiny_vlm("llava", tmp_path / "llava", layers=4, feature_layer=[-2, -3])
    source = resolve_source(str(folder))
    model = load_model(source)
    calibration = load_image_calibration(load_processor(source), "default", samples=SAMPLES)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    variants = {"16-bit": None, "read blocks": [n for n in names if ".layers.1." in n and "vision" in n],
                "unread block": [n for n in names if ".layers.3." in n and "vision" in n], "all": names}
    expected = calibration_klds(KLReference(model, calibration, BATCH), QuantCache(model, NF4), variants)
    got = streamed_klds(folder, calibration, variants, NF4, StreamOptions(batch_size=BATCH))
    for label, value in expected.items():
        assert got.kld[label] == pytest.approx(value, rel=1e-5, abs=1e-12), label
    assert got.kld["read blocks"] > 0 and got.kld["unread block"] == 0


def test_llava_whose_feature_layer_names_no_hidden_state_is_refused_with_the_fix(tmp_path):
    import json

    folder = save_tiny_vlm("llava", tmp_path / "llava")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vision_feature_layer": [-2, 3]}))
    with pytest.raises(StreamingUnsupported, match=r"vision_feature_layer \[-2, 3\] names no hidden state of this "
                                                   r"2-block vision tower .*-3 to 2\): fix vision_feature_layer"):
        streaming_need(folder, [NF4])


def test_a_vlm_whose_tower_streaming_does_not_know_is_refused_with_the_fix():
    from torch import nn

    from quantplan.analysis.stream_stages import layout_of

    language = nn.Module()
    language.layers, language.norm = nn.ModuleList([nn.Linear(4, 4)]), nn.Identity()
    model = nn.Module()
    model.model = nn.Module()
    model.model.language_model, model.model.resampler = language, nn.Linear(4, 4)  # a tower laid out otherwise
    with pytest.raises(StreamingUnsupported, match="handles the vision towers of Qwen2-VL, .*SmolVLM, not Module's: "
                                                   "run without --max-memory"):
        layout_of(model)


def test_qwen3_vl_is_refused_with_the_fix_not_run_on_unloaded_weights(tmp_path):
    """Qwen3-VL's tower has Qwen2-VL's blocks plus deepstack mergers it runs between them, whose weights a stage
    of blocks never loads: streaming it failed on meta tensors midway."""
    from quantplan.analysis.vision import calibration_for_model

    folder = save_tiny_vlm("qwen3_vl", tmp_path / "qwen3_vl")
    source = resolve_source(str(folder))
    calibration = calibration_for_model(load_model(source).config, load_processor(source), images="default",
                                        samples=2)
    with pytest.raises(StreamingUnsupported, match="not Qwen3VLForConditionalGeneration's \\(its deepstack mergers "
                                                   ".*\\): run without --max-memory"):
        analyze_streaming(folder, calibration, [NF4], progress=False, batch_size=BATCH)
    from quantplan.analysis.stream_stages import layout_of

    assert layout_of(load_model(source)).vision == "model.visual"  # in memory, the shared prefix still reads it


def test_a_vlm_streamed_on_text_alone_is_refused_with_the_fix(tmp_path):
    from quantplan.analysis.vision import calibration_for_model

    folder = save_tiny_vlm("mllama", tmp_path / "mllama")
    source = resolve_source(str(folder))
    calibration = calibration_for_model(load_model(source).config, load_processor(source), text_only=True, samples=2,
                                        seq_len=16)
    with pytest.raises(StreamingUnsupported, match="calibrated on text \\(--text-only\\) is analyzed in memory only: "
                                                   "run --text-only without --max-memory, or calibrate with --images"):
        analyze_streaming(folder, calibration, [NF4], progress=False, batch_size=BATCH, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any partial state is written


@pytest.mark.parametrize("arch", ["qwen2_vl", "mllama", "llava", "idefics3"])
def test_the_streamed_scoreboard_of_a_vlm_runs_its_language_model_on_the_heldout_text(arch, tmp_path):
    """The scoreboard's held-out windows are text: streamed, a VLM runs its language model alone, as its forward
    does without pixel values (no tower, no Mllama cross-attention layer); it refused every text batch, so a
    streamed VLM run failed after writing its checkpoint. The numbers equal the in-memory scoreboard's."""
    import numpy as np

    from quantplan.analysis.simulate import QuantCache
    from quantplan.analysis.stream_variants import StreamOptions
    from quantplan.reports.fidelity import heldout_reference, measure_variants, measure_variants_streamed

    folder = save_tiny_vlm(arch, tmp_path / arch)
    model = load_model(resolve_source(str(folder)))
    ids = torch.randint(10, 200, (3, 16), generator=torch.Generator().manual_seed(0))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    language = [n for n in linears if ".language_model." in n or ".text_model." in n]
    variants = {"16-bit": None, "all": linears, "language": language,
                "tower only": [n for n in linears if n not in language]}
    expected = measure_variants(heldout_reference(model, ids, 2), QuantCache(model, NF4), variants)
    got = measure_variants_streamed(folder, ids, variants, NF4, StreamOptions(batch_size=2))
    for label in variants:
        np.testing.assert_allclose(got[label].kld, expected[label].kld, rtol=1e-4, atol=1e-6, err_msg=label)
        np.testing.assert_allclose(got[label].nll, expected[label].nll, rtol=1e-5, err_msg=label)
    assert got["all"].kld.mean() > 0 and got["tower only"].kld.max() == 0
