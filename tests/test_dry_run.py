"""--dry-run (quantplan/dry_run.py): estimates from the config and safetensors index, no weight read."""

from __future__ import annotations

import pytest
import torch
from tiny import random_calibration, save_tiny

from quantplan.analysis import NF4, load_model, resolve_source
from quantplan.analysis.estimate import estimate_peak, meta_model
from quantplan.analysis.probe import InputProbe


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fail the test if anything loads a model or opens a safetensors file."""
    import safetensors
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run read weights")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)


@pytest.mark.parametrize("tie", [False, True])
def test_statistics_estimate_counts_the_grams_the_probe_makes(tmp_path, tie):
    folder = save_tiny(tmp_path / "model", layers=2, tie=tie)
    estimate = estimate_peak(meta_model(folder), [NF4], dtype_bytes=2, batch_size=4, seq_len=32, fisher=False)
    model = load_model(resolve_source(str(folder)))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not (tie and n == "lm_head")]
    probe = InputProbe(model, names)
    with probe.attached(), torch.inference_mode():
        model(**next(random_calibration().batches(4)))
    assert estimate.distinct_inputs == len(probe.stats)  # q/k/v and gate/up share one input
    assert estimate.statistics == sum(s.gram.data.numel() * 4 + 257 * s.gram.width * 4 for s in probe.stats.values())
    assert estimate.weights == sum(p.numel() * 2 for p in model.parameters())  # tied weights once


def test_dry_run_prints_the_estimates_and_what_would_happen(tmp_path, capsys, no_weights_read):
    from quantplan.cli import main

    folder = save_tiny(tmp_path / "model", layers=2)
    out = tmp_path / "job"
    assert main(["run", str(folder), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "no weights loaded" in printed and "all-4-bit" in printed and "16-bit" in printed
    assert "would analyze in memory" in printed and "Gram statistics" in printed
    assert not out.exists()
    assert main(["analyze", str(folder), "--out", str(out), "--dry-run", "--max-memory", "1GB"]) == 0
    assert "would analyze streamed" in capsys.readouterr().out
    assert main(["analyze", str(folder), "--out", str(out), "--dry-run", "--max-memory", "10kB"]) == 0
    assert "would stop before loading" in capsys.readouterr().out


def test_dry_run_says_when_the_model_does_not_fit(tmp_path, monkeypatch):
    from quantplan import dry_run as module
    from quantplan.analysis.config import AnalyzeConfig

    folder = save_tiny(tmp_path / "model", layers=2)
    monkeypatch.setattr(module, "available_memory", lambda device="cpu": 1000)
    result = module.dry_run(resolve_source(str(folder)), AnalyzeConfig())
    assert result.peak.total > 1000 and "more than the 0.00 GB available: pass --max-memory" in result.action


def test_auto_streams_only_when_the_in_memory_peak_does_not_fit(tmp_path, monkeypatch, capsys):
    from quantplan import dry_run as module
    from quantplan.analysis.config import AnalyzeConfig

    folder = save_tiny(tmp_path / "model", layers=2)
    source = resolve_source(str(folder))
    auto = AnalyzeConfig(max_memory="auto")
    assert module.choose_max_memory(source, auto).max_memory is None  # fits: in memory, silently
    assert capsys.readouterr().out == ""
    assert module.choose_max_memory(source, AnalyzeConfig(max_memory="2GB")).max_memory == "2GB"
    peak = module.dry_run(source, auto).peak.total
    monkeypatch.setattr(module, "available_memory", lambda device="cpu": peak - 1)
    monkeypatch.setattr(module, "UNCOVERED_BYTES", 0)
    chosen = module.choose_max_memory(source, auto)
    assert chosen.max_memory == str(peak - 1)
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and "streaming it one block at a time" in said
    asked = []
    monkeypatch.setattr(module, "available_memory", lambda device="cpu": asked.append(device) or peak - 1)
    capsys.readouterr()
    assert module.choose_max_memory(source, replace_device(auto, "cuda")).max_memory == str(peak - 1)  # GPU streams too
    assert asked == ["cuda"]  # against the GPU's free memory, not the host's
    assert "streaming it one block at a time" in capsys.readouterr().out
    monkeypatch.setattr(module, "available_memory", lambda device="cpu": 10)  # too small even to stream: in memory, saying so
    assert module.choose_max_memory(source, auto).max_memory is None
    assert "analyzing in memory anyway" in capsys.readouterr().out


def replace_device(config, device: str):
    from dataclasses import replace

    return replace(config, device=device)


def test_a_vision_language_model_streams_and_an_unknown_tower_is_refused_with_the_fix(tmp_path):
    import json

    from vlm_models import save_tiny_vlm

    from quantplan.analysis.config import AnalyzeConfig
    from quantplan.dry_run import describe, dry_run

    qwen = dry_run(resolve_source(str(save_tiny_vlm("qwen2_vl", tmp_path / "qwen"))), AnalyzeConfig(max_memory="1GB"))
    assert qwen.stream_need is not None and qwen.action.startswith("analyze streamed")
    assert "streamed analysis: largest block vision block 0 needs" in describe(qwen)  # 1024 patches a batch
    mllama = dry_run(resolve_source(str(save_tiny_vlm("mllama", tmp_path / "mllama"))), AnalyzeConfig(max_memory="1GB"))
    assert mllama.stream_need is not None and mllama.action.startswith("analyze streamed")
    llava = save_tiny_vlm("llava", tmp_path / "llava")
    config = json.loads((llava / "config.json").read_text())
    (llava / "config.json").write_text(json.dumps({**config, "vision_feature_layer": -2}))  # LLaVA-1.5's
    streamed = dry_run(resolve_source(str(llava)), AnalyzeConfig(max_memory="1GB"))
    assert streamed.stream_need is not None and streamed.action.startswith("analyze streamed")
    (llava / "config.json").write_text(json.dumps({**config, "vision_feature_layer": -4}))  # 2 blocks: -3 .. 2
    refused = dry_run(resolve_source(str(llava)), AnalyzeConfig(max_memory="1GB"))
    assert refused.stream_need is None and refused.action.startswith("stop: --max-memory cannot stream")
    assert "vision_feature_layer -4 names no hidden state of this 2-block vision tower" in refused.action
    assert "fix vision_feature_layer in the model's config.json" in refused.action


def test_free_memory_of_a_device_this_machine_lacks_is_unknown():
    import torch

    from quantplan import dry_run as module

    assert module.available_memory("cpu") is None or module.available_memory("cpu") > 0
    if not torch.cuda.is_available():
        assert module.available_memory("cuda") is None  # auto then analyzes in memory, as before


def test_a_cap_the_scoreboard_cannot_keep_is_refused_before_the_analysis(tmp_path, no_weights_read):
    """The analysis fits the cap but the streamed scoreboard's head (one batch per variant) does not: the run
    refuses at once, naming the step and the cap that would do, instead of failing after the analysis."""
    from quantplan.analysis.config import AnalyzeConfig
    from quantplan.dry_run import check_streamed_run_fits
    from quantplan.reports.compare import CompareConfig

    source = resolve_source(str(save_tiny(tmp_path / "model", layers=2, vocab=4096)))
    config = AnalyzeConfig(max_memory="30MB", dtype="fp32")
    check_streamed_run_fits(source, config, verify=True, compare=None)  # analysis and verification fit
    wide = CompareConfig(batch_size=64, seq_len=256)
    with pytest.raises(ValueError, match=r"fidelity scoreboard.*pass --max-memory \d+(\.\d\d)?[GM]B or more"):
        check_streamed_run_fits(source, config, verify=True, compare=wide)
    check_streamed_run_fits(source, AnalyzeConfig(max_memory="1GB", dtype="fp32"), verify=True, compare=wide)
    check_streamed_run_fits(source, AnalyzeConfig(dtype="fp32"), verify=True, compare=wide)  # in memory: no cap


def test_run_refuses_the_cap_before_writing_anything(tmp_path):
    from quantplan.analysis.config import AnalyzeConfig
    from quantplan.pipeline import run
    from quantplan.reports.compare import CompareConfig

    folder = save_tiny(tmp_path / "model", layers=2, vocab=4096)
    out = tmp_path / "job"
    with pytest.raises(ValueError, match="fidelity scoreboard"):
        run(str(folder), "+10%", out, AnalyzeConfig(max_memory="30MB", dtype="fp32", samples=2, seq_len=16),
            compare=CompareConfig(batch_size=64, seq_len=256))
    assert not (out / "sensitivity.parquet").exists()


def test_smollm2s_cap_of_150mb_fits_its_streamed_checks(tmp_path):
    """Issue #13's SmolLM2 target cap (150 MB, bf16): the streamed verification and scoreboard fit it. Their head
    holds the tied embedding, its streams and one chunk's comparison; no description of the embedding (row chunks)
    is done there (found on a GPU: that term asked for 0.16 GB)."""
    import json

    from transformers import LlamaConfig

    from quantplan.analysis import parse_formats
    from quantplan.analysis.stream_variants import variants_need

    shape = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
             "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True}
    LlamaConfig(**shape).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"]
    head = 49152 * 576 * 2  # the tied embedding in bf16
    for device in ("cpu", "cuda"):
        for variants in (5, 8):  # the verification's, the scoreboard's with three random seeds
            need, label = variants_need(tmp_path, parse_formats("nf4,nf4-bs32"), variants=variants,
                                        dtype=torch.bfloat16, device=device)
            assert label == "norm + lm_head" and 2 * head < need < 150 * 10**6, (device, variants, need)
        # the scoreboard's exported checkpoint (bf16, tied head kept 16-bit): its head is the 16-bit one, shared
        need, _ = variants_need(tmp_path, parse_formats("nf4,nf4-bs32"), variants=9, dtype=torch.bfloat16,
                                device=device, exported_dtype=torch.bfloat16)
        assert need < 150 * 10**6, (device, need)
        fp32, _ = variants_need(tmp_path, parse_formats("nf4,nf4-bs32"), variants=9, dtype=torch.float32,
                                device=device, exported_dtype=torch.bfloat16)
        plain, _ = variants_need(tmp_path, parse_formats("nf4,nf4-bs32"), variants=9, dtype=torch.float32,
                                 device=device)
        assert fp32 >= plain + head  # an fp32 stream holds the checkpoint's bf16 head beside its own


def test_dry_run_gives_the_streamed_refinements_need_against_the_cap(tmp_path, no_weights_read):
    """The gradient pass of --refine / --context / the automatic refinement under a cap: its largest block's need,
    and what happens when it is above the cap (refused / skipped)."""
    from quantplan.analysis.config import AnalyzeConfig
    from quantplan.analysis.stream_gains import gradient_pass_need
    from quantplan.dry_run import describe, dry_run

    folder = save_tiny(tmp_path / "model", layers=2)
    source = resolve_source(str(folder))
    roomy = dry_run(source, AnalyzeConfig(max_memory="1GB"))
    from quantplan.analysis.models import dtype_from_name

    config = AnalyzeConfig(max_memory="1GB")
    need, label = gradient_pass_need(folder, config.format_values(), dtype=dtype_from_name(config.dtype))
    assert (roomy.gradient_need, roomy.gradient_note) == (need, label) and need > 0
    assert f"streamed refinement (--refine, --context, the automatic refinement): largest block {label}" in describe(roomy)
    assert "would be refused" not in describe(roomy)
    tight = dry_run(source, AnalyzeConfig(max_memory=str(need - 1)))
    assert "would be refused and the automatic refinement skipped" in describe(tight)


def test_a_vlm_calibrated_on_text_is_never_streamed_by_auto(tmp_path):
    """Its streamed analysis needs images: --max-memory auto keeps a --text-only VLM in memory, saying why, instead
    of streaming it into a refusal that names a flag the user never passed."""
    from vlm_models import save_tiny_vlm

    from quantplan import dry_run as module
    from quantplan.analysis.config import AnalyzeConfig

    source = resolve_source(str(save_tiny_vlm("qwen2_vl", tmp_path / "qwen")))
    need, why = module._stream_need(source, AnalyzeConfig(text_only=True))
    assert need is None and "calibrated on text (--text-only) is analyzed in memory" in why
    assert module._stream_need(source, AnalyzeConfig())[0] > 0
    llm = resolve_source(str(save_tiny(tmp_path / "llm", layers=1)))
    assert module._stream_need(llm, AnalyzeConfig(text_only=True))[0] > 0  # an LLM streams as ever
