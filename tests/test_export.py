"""planner/: skip lists under transformers' own matcher, and the export round trip (tiny model)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import stat

import pytest
import torch
from tiny import random_calibration, save_tiny
from transformers import AutoModelForCausalLM
from transformers.quantizers.quantizers_utils import should_convert_module

from quantplan import AnalyzeConfig, run
from quantplan.analysis import NF4, TableMismatch, analyze, load_model, resolve_source
from quantplan.cli import main
from quantplan.planner import ExportError, Plan, export, plan
from quantplan.planner.plan_types import PLAN_VERSION
from quantplan.planner.skiplist import SkipListError, build_skip_list, verify_skip_list


def test_skip_list_hits_exactly_the_planned_modules():
    kept = ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj", "lm_head"]
    quantized = ["model.layers.10.mlp.down_proj", "model.layers.11.self_attn.q_proj",
                 "model.layers.1.mlp.up_proj", "model.layers.21.mlp.down_proj"]
    entries = build_skip_list(kept, quantized)
    assert entries == ["lm_head", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    for name in kept:
        assert not should_convert_module(name, entries)
    for name in quantized:
        assert should_convert_module(name, entries)


def test_prefix_entry_would_catch_other_layers():
    # a dotted prefix is legal in transformers 5, and the boundary keeps layer 10 out...
    assert should_convert_module("model.layers.10.mlp.down_proj", ["model.layers.1.mlp"])
    # ...but a plain suffix collision is real: such names get an anchored entry instead
    kept, quantized = ["model.layers.0.fc1"], ["vision_model.model.layers.0.fc1"]
    entries = build_skip_list(kept, quantized)
    assert entries == [r"^model\.layers\.0\.fc1$"]
    assert not should_convert_module("model.layers.0.fc1", entries)
    assert should_convert_module("vision_model.model.layers.0.fc1", entries)


def test_verify_refuses_a_list_that_catches_too_much():
    with pytest.raises(SkipListError, match="would keep"):
        verify_skip_list(["model.layers.1"], ["model.layers.1.mlp.up_proj"],
                         ["model.layers.1.self_attn.q_proj"])


@pytest.fixture(scope="module")
def tiny12(tmp_path_factory):
    """A 12-layer tiny model: layer 1 vs layers 10/11 is where loose skip lists go wrong."""
    folder = save_tiny(tmp_path_factory.mktemp("tiny12"), layers=12)
    source = resolve_source(str(folder))
    table = analyze(load_model(source), random_calibration(), [NF4], progress=False,
                    model_fingerprint=source.fingerprint, model_id=str(folder))
    return source, table


def test_export_reload_follows_plan_under_transformers(tiny12, tmp_path):
    source, table = tiny12
    p = plan(table, "+15%", keep=["model.layers.1.mlp.down_proj"])
    result = export(source, p, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    modules = dict(reloaded.named_modules())
    assert type(modules["model.layers.1.mlp.down_proj"]) is torch.nn.Linear
    assert type(modules["model.layers.10.mlp.down_proj"]).__name__ == "Linear4bit"
    assert type(modules["lm_head"]) is torch.nn.Linear
    assert result.footprint_bytes == reloaded.get_memory_footprint()
    assert result.footprint_bytes == pytest.approx(p.predicted.footprint_bytes, rel=0.01)
    assert result.checkpoint_bytes == pytest.approx(p.predicted.bytes, rel=0.01)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "model.layers.1.mlp.down_proj" in card and "pinned: --keep" in card
    assert "Made by quantplan" in card and "](https://github.com/)" not in card  # no placeholder link
    out = reloaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_version_1_plan_json_exports_the_same(tiny12, tmp_path):
    from test_plan_types import v1_plan_json, v1_reasons

    source, table = tiny12
    p = plan(table, "+30%", keep=["model.layers.1.mlp.down_proj"], quantize=["model.layers.0.mlp.down_proj"])
    (tmp_path / "plan.json").write_text(json.dumps(v1_plan_json(p, v1_reasons(p))))
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.choices == p.choices and loaded.skip_modules == p.skip_modules
    result = export(source, loaded, tmp_path / "out")  # reloads and checks every module's type itself
    assert result.kept == len(p.kept) and result.checkpoint_bytes == pytest.approx(p.predicted.bytes, rel=0.01)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "pinned: --keep model.layers.1.mlp.down_proj" in card and "shipped: plan" in card
    assert "## Loader compatibility" in card and "vLLM-safe:" in card
    assert json.loads((tmp_path / "out" / "quantplan_plan.json").read_text())["version"] == PLAN_VERSION


def test_export_refuses_existing_dir_and_foreign_plan(tiny12, tmp_path):
    source, table = tiny12
    p = plan(table, "+10%")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "quantplan_plan.json").write_text("{}")  # a folder quantplan wrote
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(source, p, tmp_path / "taken")
    foreign = dataclasses.replace(p, model_fingerprint="local:someone-else")  # plans are frozen
    with pytest.raises(TableMismatch, match="another model"):
        export(source, foreign, tmp_path / "fresh")


def test_export_of_an_int8_plan_is_refused(tiny12, tmp_path):
    source, _ = tiny12
    from quantplan.analysis import INT8

    table = analyze(load_model(source), random_calibration(), [NF4, INT8], progress=False,
                    model_fingerprint=source.fingerprint)
    p = plan(table, "+60%", tiers=["nf4", "int8"])
    assert "int8" in p.choices.values()
    with pytest.raises(ExportError, match="--tiers nf4"):
        export(source, p, tmp_path / "out")


def test_interrupted_export_leaves_nothing(tiny12, tmp_path, monkeypatch):
    source, table = tiny12
    p = plan(table, "+10%")

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(importlib.import_module("quantplan.planner.export"), "write_model_card", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export(source, p, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no staging folder


def test_overwrite_replaces_atomically(tiny12, tmp_path):
    source, table = tiny12
    export(source, plan(table, "+10%"), tmp_path / "out")
    result = export(source, plan(table, "+30%"), tmp_path / "out", overwrite=True)
    assert result.kept > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_never_deletes_a_folder_quantplan_did_not_write(tiny12, tmp_path, capsys):
    source, table = tiny12
    table.save(tmp_path / "job")
    assert main(["plan", "--table", str(tmp_path / "job"), "--budget", "+10%"]) == 0
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    for flags in ([], ["--overwrite"]):
        code = main(["export", str(source.path), "--plan", str(tmp_path / "job" / "plan.json"), "--out", str(out),
                     *flags])
        err = capsys.readouterr().err
        assert code == 2 and "keep.txt" in err and "quantplan did not write" in err and len(err.splitlines()) == 1
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job", "mine"]  # no staging folder left behind
    # `run --out DIR --overwrite` applies the same rule to DIR/checkpoint, before any analysis
    (tmp_path / "job2" / "checkpoint").mkdir(parents=True)
    (tmp_path / "job2" / "checkpoint" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="quantplan did not write"):
        run(str(source.path), "+10%", tmp_path / "job2", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "job2").iterdir()) == ["checkpoint"]
    # an empty folder is free, with or without --overwrite
    (tmp_path / "empty").mkdir()
    assert main(["export", str(source.path), "--plan", str(tmp_path / "job" / "plan.json"), "--out",
                 str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "quantplan_plan.json").is_file()


def test_checkpoint_modes_follow_the_umask(tiny12, tmp_path):
    source, table = tiny12
    old = os.umask(0o022)
    try:
        export(source, plan(table, "+10%"), tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "out", *(tmp_path / "out").iterdir()]}
    assert modes.pop("out") == 0o755
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_run_main_job_on_tiny_model(tiny_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(" ".join(f"w{(i * 13 + j) % 250 + 3}" for j in range(40)) for i in range(60)))
    options = AnalyzeConfig(calib=str(calib), samples=8, seq_len=32, progress=False)
    out = run(str(tiny_dir), "+20%", tmp_path / "job", options)
    for key in ("table", "plan", "pareto", "checkpoint"):
        assert out[key].exists()
    verification = json.loads(out["plan"].read_text())["checks"]["verification"]  # on by default
    assert verification["chosen"] == "plan" and verification["tokens"] == 8 * 32
    assert "Checked on 256 calibration tokens" in (out["checkpoint"] / "README.md").read_text()
    assert (tmp_path / "job" / "sensitivity.json").exists()
    # the second run reuses the table (no new analysis) and refuses to clobber the checkpoint
    with pytest.raises(FileExistsError):
        run(str(tiny_dir), "+20%", tmp_path / "job", options)
    again = run(str(tiny_dir), "+40%", tmp_path / "job", options, overwrite=True)
    assert again["plan_obj"].table_hash == out["plan_obj"].table_hash


def test_cli_bad_inputs_exit_2_with_one_line(tiny12, tmp_path, capsys):
    source, table = tiny12
    table.save(tmp_path)
    assert main(["plan", "--table", str(tmp_path), "--budget", "lots"]) == 2
    assert "cannot read budget 'lots'" in capsys.readouterr().err
    assert main(["plan", "--table", str(tmp_path), "--budget", "10kB"]) == 2
    assert "below this model's minimum" in capsys.readouterr().err
    assert main(["plan", "--table", str(tmp_path), "--keep", "nothing.like.this"]) == 2
    assert "matches no module" in capsys.readouterr().err
    assert main(["plan", "--table", str(tmp_path / "missing")]) == 2
    assert main(["plan", "--table", str(tmp_path), "--budget", "+25%"]) == 0
    assert (tmp_path / "plan.json").exists() and (tmp_path / "pareto.csv").exists()
    assert main(["export", str(source.path), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_run_writes_checkpoint_and_report(tiny_dir, tmp_path):
    def corpus(path, offset):
        path.write_text("\n\n".join(" ".join(f"w{(i * 17 + j + offset) % 250 + 3}" for j in range(40))
                                    for i in range(60)))
        return str(path)

    calib, heldout = corpus(tmp_path / "calib.txt", 0), corpus(tmp_path / "heldout.txt", 101)
    out = tmp_path / "job"
    budget = device_budget_for(tiny_dir, over_4bit=0.2, context=256)
    code = main(["run", str(tiny_dir), "--calib", calib, "--samples", "8", "--seq-len", "32", "--quiet",
                 "--budget", str(budget), "--kv-context", "256", "--kv-batch", "1",
                 "--heldout", heldout, "--heldout-samples", "2", "--heldout-seq-len", "32", "--top-k", "2",
                 "--random-k", "2", "--max-new-tokens", "4", "--out", str(out), "--context", "--objective", "restore",
                 "--refine", "2", "--end-to-end-batches", "1"])
    assert code == 0
    checks = json.loads((out / "plan.json").read_text())["checks"]
    assert checks["refinement"]["rounds"] == 2 and checks["refinement"]["tokens"] == 4 * 32  # one batch of 4
    assert checks["verification"]["tokens"] == 4 * 32
    for name in ("sensitivity.parquet", "plan.json", "pareto.csv", "checkpoint/config.json", "scoreboard.csv",
                 "report.html", "report.md"):
        assert (out / name).exists(), name
    saved = Plan.load(out / "plan.json")  # refined and verified under the weights' share of the device budget
    assert saved.device.bytes == budget and saved.predicted.bytes <= saved.device.weights_bytes
    assert saved.compat is not None and len(saved.compat.alternatives) == 2
    report = (out / "report.md").read_text()
    assert "KV cache" in report and "Loader compatibility" in report and "--vllm-safe" in report
    card = (out / "checkpoint" / "README.md").read_text()
    assert "| KV cache (16-bit, 1 x 256 tokens) |" in card and "vLLM-safe:" in card


def device_budget_for(folder, over_4bit: float, context: int) -> int:
    """A device budget holding the model ``over_4bit`` above all-4-bit plus the KV cache and activations."""
    from transformers import AutoConfig

    from quantplan.analysis.attention import attention_config
    from quantplan.analysis.estimate import estimate_sizes
    from quantplan.planner.kv_cache import activation_bytes, kv_cache_bytes

    attention = attention_config(AutoConfig.from_pretrained(folder))
    weights = estimate_sizes(folder, NF4).bytes_all_4bit * (1 + over_4bit)
    return int(weights + kv_cache_bytes(attention, context) + activation_bytes(attention, context))


def test_an_all_16bit_plan_over_blocksize_32_exports_plain_16bit(tmp_path):
    """A plan that keeps every module 16-bit exports no quantization config, whatever its formats: over nf4-bs32
    alone it asked transformers' BitsAndBytesConfig for blocksize 32 first and failed."""
    import json

    from tiny import random_calibration, save_tiny

    from quantplan.analysis import analyze, load_model, resolve_source
    from quantplan.analysis.formats import NF4_BS32
    from quantplan.planner import export, plan

    source = resolve_source(str(save_tiny(tmp_path / "model", layers=1)))
    table = analyze(load_model(source), random_calibration(samples=2), [NF4_BS32], progress=False,
                    model_fingerprint=source.fingerprint)
    with pytest.warns(UserWarning, match="plain 16-bit checkpoint"):
        p = plan(table, "2.0x")
    export(source, p, tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
