"""The blocksize-menu checkpoint written tensor by tensor from disk (planner/prequantized_stream.py): the same
keys, tensors and config as the in-memory writer, plain ``from_pretrained`` loads it at the planned blocksizes,
and the export never loads the 16-bit model whole."""

from __future__ import annotations

import importlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import random_calibration, save_tiny, word_tokenizer
from transformers import AutoModelForCausalLM
from vlm_models import save_tiny_vlm

from quantplan.analysis import NF4, analyze, load_model, resolve_source
from quantplan.analysis.formats import NF4_BS32
from quantplan.planner import KEEP, export, plan
from quantplan.planner.export import check_module_types
from quantplan.planner.prequantized import check_blocksizes, write_prequantized
from quantplan.planner.prequantized_stream import write_streamed
from quantplan.planner.reasons import Reason, ReasonKind
from quantplan.planner.skiplist import build_skip_list

export_module = importlib.import_module("quantplan.planner.export")
stream_module = importlib.import_module("quantplan.planner.prequantized_stream")


@pytest.fixture(scope="module")
def base_plan(tmp_path_factory):
    """A plan from a tiny Llama's menu table; the tests replace its choices and skip list."""
    source = resolve_source(str(save_tiny(tmp_path_factory.mktemp("base"), layers=1)))
    table = analyze(load_model(source), random_calibration(samples=2), [NF4, NF4_BS32], progress=False,
                    model_fingerprint=source.fingerprint)
    return plan(table, "+5%")


def cycled(base, source, head: str = KEEP):
    """``base`` for ``source``'s model with its quantizable Linears cycling through nf4, nf4-bs32 and 16-bit."""
    model = load_model(source)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
             and m.weight.numel() % 64 == 0]
    choices = {n: (NF4.name, NF4_BS32.name, KEEP)[i % 3] for i, n in enumerate(names)}
    if "lm_head" in dict(model.named_modules()):
        choices["lm_head"] = head
    kept = [n for n, c in choices.items() if c == KEEP]
    return replace(base, choices=choices, model_fingerprint=source.fingerprint,
                   reasons={n: Reason(ReasonKind.PINNED_KEEP if c == KEEP else ReasonKind.PINNED_QUANTIZE, "test")
                            for n, c in choices.items()},
                   skip_modules=build_skip_list(kept, [n for n in choices if n not in kept]))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("model", ["llama", "llama-tied", "qwen2_vl"])
def test_streamed_checkpoint_equals_the_in_memory_one_and_reloads_at_the_planned_blocksizes(
        base_plan, tmp_path, model):
    if model == "qwen2_vl":  # transformers 5 renames its modules on load: the saved names are the hub's
        folder = save_tiny_vlm("qwen2_vl", tmp_path / "model")
    else:
        folder = save_tiny(tmp_path / "model", layers=2, tie=model == "llama-tied")
    source = resolve_source(str(folder))
    p = cycled(base_plan, source, head=NF4_BS32.name if model == "llama" else KEEP)  # a tied head stays 16-bit
    assert {c for c in p.choices.values()} == {NF4.name, NF4_BS32.name, KEEP}
    write_prequantized(load_model(source), p, tmp_path / "memory", torch.bfloat16)
    (tmp_path / "streamed").mkdir()
    write_streamed(folder, p, tmp_path / "streamed", torch.bfloat16, max_shard_bytes=20_000)

    memory, streamed = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert streamed.keys() == memory.keys()
    for key, tensor in memory.items():
        assert streamed[key].dtype == tensor.dtype and torch.equal(streamed[key], tensor), key
    if model == "llama-tied":
        assert "lm_head.weight" not in streamed  # saved once, as the embedding
    if model == "qwen2_vl":
        assert "model.layers.0.mlp.up_proj.weight.absmax" in streamed  # hub names, quant states included
    shards = sorted((tmp_path / "streamed").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not list((tmp_path / "streamed").glob("*.tmp"))
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == streamed.keys() and set(index["weight_map"].values()) == {
        s.name for s in shards}
    for name in ("config.json", "generation_config.json"):
        assert (json.loads((tmp_path / "streamed" / name).read_text())
                == json.loads((tmp_path / "memory" / name).read_text())), name

    reloaded = load_model(resolve_source(str(tmp_path / "streamed")), dtype="auto")
    check_module_types(reloaded, p)  # every 4-bit module a Linear4bit, every kept one a Linear
    assert check_blocksizes(reloaded, p) == []


def test_menu_export_streams_and_never_loads_the_16bit_model(base_plan, tmp_path, monkeypatch, capsys):
    def whole(*args, **kwargs):
        raise AssertionError("the menu export loaded the 16-bit model whole")

    monkeypatch.setattr(export_module, "_load_16bit", whole)
    monkeypatch.setattr(stream_module, "MAX_SHARD_BYTES", 30_000)
    source = resolve_source(str(save_tiny(tmp_path / "model", layers=2)))
    p = cycled(base_plan, source, head=NF4.name)
    assert p.mixed_blocksizes
    export(source, p, tmp_path / "out")
    assert "loaded whole" not in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    modules = dict(reloaded.named_modules())
    for name, choice in p.choices.items():
        if choice == KEEP:
            assert type(modules[name]) is torch.nn.Linear, name
        else:
            assert modules[name].weight.quant_state.blocksize == p.formats[choice]["blocksize"], name
    assert torch.isfinite(reloaded(torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_a_source_without_safetensors_is_written_from_the_16bit_model_saying_so(base_plan, tmp_path, capsys):
    folder = save_tiny(tmp_path / "model", layers=2)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    source = resolve_source(str(folder))
    p = cycled(base_plan, source)
    export(source, p, tmp_path / "out")
    assert "holds no safetensors files" in capsys.readouterr().out
    reloaded = load_model(resolve_source(str(tmp_path / "out")), dtype="auto")
    assert check_blocksizes(reloaded, p) == []


def test_export_under_a_memory_cap_writes_shards_of_an_eighth_of_it(base_plan, tmp_path, monkeypatch):
    """Under --max-memory the writer holds one shard bounded by the cap, not up to 1 GB (the whole 4-bit model of
    a deep model): the export's resident memory stays flat in depth."""
    from safetensors import safe_open

    from quantplan.planner.prequantized_stream import MAX_SHARD_BYTES, MIN_SHARD_BYTES, shard_bytes_for

    assert shard_bytes_for(None) == MAX_SHARD_BYTES == shard_bytes_for(100 * 10**9)
    assert shard_bytes_for(260 * 10**6) == 260 * 10**6 // 8 and shard_bytes_for(10**6) == MIN_SHARD_BYTES
    monkeypatch.setattr(stream_module, "MIN_SHARD_BYTES", 1)
    source = resolve_source(str(save_tiny(tmp_path / "model", layers=2)))
    p = cycled(base_plan, source, head=NF4.name)
    export(source, p, tmp_path / "whole")
    assert (tmp_path / "whole" / "model.safetensors").is_file()  # no cap: one shard of up to 1 GB
    cap = 8 * 12_000
    export(source, p, tmp_path / "capped", max_memory=cap)
    shards = sorted((tmp_path / "capped").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        assert len(sizes) == 1 or shard.stat().st_size <= cap // 8 + 4096, shard.name  # a lone big tensor alone
    assert tensors(tmp_path / "capped").keys() == tensors(tmp_path / "whole").keys()


@pytest.mark.parametrize("source_dtype, run_dtype, reused", [
    ("bf16", "bf16", True),   # the default run: the analysis' packed weights are the export's
    ("bf16", "fp32", True),   # --dtype fp32 of a bf16 model: the same values upcast; the quant state says bf16
    ("fp32", "fp32", False),  # a float32 model written in bf16: the values differ, so it is quantized again
])
def test_a_runs_export_reuses_the_packed_weights_made_from_the_values_it_writes(
        base_plan, tmp_path, monkeypatch, source_dtype, run_dtype, reused):
    """The export takes the analysis' packed weight exactly where bitsandbytes would make the same bytes from what it
    reads: the checkpoint is the one written without reuse, byte for byte, quant states included."""
    from tiny import tiny_llama, word_tokenizer

    from quantplan.shared_model import SharedModel

    folder = tmp_path / "model"
    model = tiny_llama(layers=2)  # bf16 values
    if source_dtype == "fp32":  # values bf16 cannot hold
        model = model.float()
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(1 + 2.0 ** -12)
    model.save_pretrained(folder)
    word_tokenizer(256).save_pretrained(folder)
    source = resolve_source(str(folder))
    p = cycled(base_plan, source, head=NF4_BS32.name)
    (tmp_path / "plain").mkdir()
    write_streamed(folder, p, tmp_path / "plain", torch.bfloat16)

    shared = SharedModel(source, run_dtype, "cpu")
    loaded, formats = shared.get(), {NF4.name: NF4, NF4_BS32.name: NF4_BS32}
    planned = {n: formats[t] for n, t in p.choices.items() if t != KEEP}
    for name, fmt in planned.items():  # what the analysis leaves in the store
        shared.packed.get(name, fmt, loaded.get_submodule(name).weight)
    made, quantize = [], type(NF4).quantize

    def counted(fmt, weight):
        made.append(weight)
        return quantize(fmt, weight)
    monkeypatch.setattr(type(NF4), "quantize", counted)
    (tmp_path / "reused").mkdir()
    write_streamed(folder, p, tmp_path / "reused", torch.bfloat16, reuse=shared.export_reuse())

    made = [w for w in made if w.shape[0] > 1]  # not the one-row probe of each format's state entries
    assert len(made) == (0 if reused else len(planned))
    plain, written = tensors(tmp_path / "plain"), tensors(tmp_path / "reused")
    assert written.keys() == plain.keys()
    for key, tensor in plain.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    # the store still de-quantizes to the run's dtype (the scoreboard reads it after the export)
    name, fmt = next(iter(planned.items()))
    assert shared.packed.get(name, fmt, loaded.get_submodule(name).weight)[1].dtype == loaded.dtype


def test_fused_moe_experts_are_written_from_the_loaded_model_saying_why(base_plan, tmp_path, capsys):
    """transformers 5 holds a Mixtral layer's experts as one 3-D parameter and saves them one tensor per expert:
    tracing the saved names failed on that split (IndexError out of the export); now the stream says it cannot
    read them, the checkpoint is written from the loaded model and reloads at the planned blocksizes."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from quantplan.analysis.stream_weights import DiskWeights, StreamingUnsupported, saved_names
    from quantplan.analysis.streaming import analyze_streaming, skeleton

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "moe")
    word_tokenizer().save_pretrained(tmp_path / "moe")
    source = resolve_source(str(tmp_path / "moe"))
    model = skeleton(source.path, torch.bfloat16)
    names = [n for n, _ in model.named_parameters()]
    mapped = saved_names(model, names)
    experts = next(n for n in names if ".experts." in n)
    assert experts not in mapped and mapped["model.layers.0.self_attn.q_proj.weight"].endswith("q_proj.weight")
    with pytest.raises(StreamingUnsupported, match="saved split or merged.*MoE experts"):
        DiskWeights(source.path, model).key(experts)
    with pytest.warns(UserWarning, match="no Linear holds"), pytest.raises(  # before any batch runs
            StreamingUnsupported, match="saved split or merged.*run without --max-memory"):
        analyze_streaming(source.path, random_calibration(samples=2), [NF4], progress=False)

    p = cycled(base_plan, source)
    assert p.mixed_blocksizes
    export(source, p, tmp_path / "out")
    assert "more than a renaming when it saves (e.g. fused MoE experts" in capsys.readouterr().out
    reloaded = load_model(resolve_source(str(tmp_path / "out")), dtype="auto")
    assert check_blocksizes(reloaded, p) == []
    assert torch.isfinite(reloaded(torch.tensor([[5, 6, 7, 8]])).logits).all()
