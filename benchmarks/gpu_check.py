"""The CUDA path end to end, in a few minutes on one GPU: run in memory and streamed, export, reload, compare.

For each model (default: a random-init model with SmolLM2-135M's shapes and tokenizer, and a
synthetic ~1.1B Llama: hidden 2048, MLP 5632, 20 layers, untied head) the script runs, each in
a fresh child process:

1. ``quantplan run MODEL --device cuda --budget +10%`` (the default job: Fisher analysis in
   memory, plan, never-worse verification, export, reload check, quick fidelity report);
2. the same with ``--max-memory CAP`` (the whole job streamed one block at a time through the
   GPU: analysis, verification, export, report); both measure the default blocksize menu (NF4 at
   blocksize 64 and 32), so the tables and the per-module formats compare;
3. a reload of the exported checkpoint with plain ``from_pretrained(device_map=DEVICE)`` and
   a few greedy tokens (its blocksizes: both menu entries when the plan uses both);
4. the Fisher analysis of the menu stopped by Ctrl-C in its first batches and continued with
   ``--resume`` (the saved statistics are read onto the CPU, the next batches run on the GPU): the
   resumed table against an uninterrupted one, column by column.

It records each run's stage profile (seconds, peak resident memory, peak GPU memory
allocated), the largest relative difference between the streamed and the in-memory tables
per score column, whether both plans keep the same modules, and the reload's footprint
against the plan's predicted bytes. Real SmolLM2 weights (269 MB) are not needed: the GPU
machines this was written for receive at most 64 MiB of files, so the SmolLM2-shaped model is
random (same shapes and tokenizer: the same work, not the same plan quality).

    python benchmarks/gpu_check.py [--device cuda] [--tokenizer DIR] [--models smol,big] [--time-limit 420]
        [--no-compare] [--out benchmarks/results/gpu_check.json]

A step that fails is recorded with its error and the next one still runs; no new step starts
after ``--time-limit`` seconds. ``--shape tiny --device cpu`` is a smoke run (tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # also uninstalled
from _machine import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "gpu_check.json"
SMOL = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": 8192}
BIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 20, "num_attention_heads": 32,
       "num_key_value_heads": 8, "tie_word_embeddings": False, "max_position_embeddings": 4096}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": False}
#: model -> (config keys, streaming cap); ``--shape tiny`` replaces every shape by TINY
MODELS = {"smol": (SMOL, "150MB"), "big": (BIG, "950MB")}  # smol: issue #13's SmolLM2 cap
#: weight shapes whose measurement work space is measured on the device (an lm_head, an MLP pair)
WORK_SHAPES = ((49152, 2048), (5632, 2048), (2048, 5632))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="folder with SmolLM2's tokenizer files (default: the offline SmolLM2)")
    parser.add_argument("--models", default="smol,big")
    parser.add_argument("--shape", choices=("real", "tiny"), default="real")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--no-compare", action="store_true", help="skip the fidelity report (a faster smoke run)")
    parser.add_argument("--time-limit", type=float, default=420.0, help="start no step after this many seconds")
    parser.add_argument("--work", type=Path, default=None, help="folder for models and runs (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    tokenizer = args.tokenizer or _offline_tokenizer()
    result = {"machine": machine_info(), "device": args.device, "gpu": _gpu(), "shape": args.shape,
              "calibration": {"samples": args.samples, "seq_len": args.seq_len}, "models": {}}
    result["measure_work"] = _child([sys.executable, __file__, "--child", "measure_work", args.device])
    with tempfile.TemporaryDirectory(prefix="quantplan-gpu-", dir=args.work) as work:
        for name in args.models.split(","):
            shape, cap = MODELS[name]
            shape = TINY if args.shape == "tiny" else shape
            cap = "200MB" if args.shape == "tiny" else cap  # fp32 on a CPU without native bf16 (--dtype auto)
            budget = "+1%" if args.shape == "tiny" else "+10%"  # tiny: the 16-bit embeddings dwarf the Linears
            steps = _Steps(started, args.time_limit)
            folder = Path(work) / name
            steps.run("build", ["build", str(folder), json.dumps(shape), str(tokenizer), args.device])
            common = ["--device", args.device, "--budget", budget, "--samples", str(args.samples),
                      "--seq-len", str(args.seq_len), "--quiet", "--overwrite", "--heldout-samples", "8",
                      "--no-equalize",  # streamed runs read the source weights as they are: the same measurement
                      *(["--no-compare"] if args.no_compare else [])]
            memory, streamed = Path(work) / f"{name}-memory", Path(work) / f"{name}-streamed"
            steps.cli("run in memory", [str(folder), "--out", str(memory), "--max-memory", "auto", *common], memory)
            steps.cli(f"run streamed (--max-memory {cap})", [str(folder), "--out", str(streamed), "--max-memory", cap,
                                                             *common], streamed)
            steps.run("reload + generate", ["reload", str(memory / "checkpoint"), args.device])
            steps.run("Ctrl-C + --resume", ["resume", str(folder), args.device, str(args.samples), str(args.seq_len)])
            result["models"][name] = {"shape": shape, "max_memory": cap, "budget": budget, "steps": steps.done,
                                      "agreement": _agreement(memory, streamed)}
            print(json.dumps({name: result["models"][name]}, indent=1), flush=True)
    result["total_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    _print_table(result)
    return 0


class _Steps:
    """Child processes run one after another; a failure is recorded and the next step still runs."""

    def __init__(self, started: float, limit: float):
        self.started, self.limit, self.done = started, limit, {}

    def _go(self, label: str) -> bool:
        if time.perf_counter() - self.started > self.limit:
            self.done[label] = {"ok": False, "error": "skipped: --time-limit reached"}
            return False
        return True

    def run(self, label: str, child_args: list[str]) -> None:
        if self._go(label):
            self.done[label] = _child([sys.executable, __file__, "--child", *child_args])

    def cli(self, label: str, cli_args: list[str], out: Path) -> None:
        if not self._go(label):
            return
        step = _child([sys.executable, "-m", "quantplan", "run", *cli_args], json_out=False)
        if (out / "profile.json").is_file():
            step["profile"] = json.loads((out / "profile.json").read_text())
        if (out / "plan.json").is_file():
            plan = json.loads((out / "plan.json").read_text())
            step["plan"] = {"kept": plan.get("skip_modules"), "predicted_bytes": plan["predicted"]["bytes"]}
        self.done[label] = step


def _child(command: list[str], json_out: bool = True) -> dict:
    """Run ``command`` (the repository importable); its wall seconds, and its last line's JSON when asked."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    step = {"ok": done.returncode == 0, "wall_s": round(time.perf_counter() - start, 2)}
    if done.returncode != 0:
        step["error"] = (done.stderr or done.stdout)[-3000:]
        print(f"step failed: {' '.join(command[1:4])}...\n{step['error']}", flush=True)
    elif json_out:
        step.update(json.loads(done.stdout.strip().splitlines()[-1]))
    else:
        step["stdout_tail"] = done.stdout[-1500:]
    return step


def _agreement(memory: Path, streamed: Path) -> dict:
    """Largest relative difference per score column of the two tables, and whether the plans choose the same formats."""
    from streaming_fisher import _compare

    tables = [d / "sensitivity.parquet" for d in (memory, streamed)]
    plans = [d / "plan.json" for d in (memory, streamed)]
    if not all(t.is_file() for t in tables) or not all(p.is_file() for p in plans):
        return {"compared": False}
    same = json.loads(plans[0].read_text())["choices"] == json.loads(plans[1].read_text())["choices"]
    return {"compared": True, "same_plan": same, **_compare(memory, streamed)}


def child_build(folder: str, shape: str, tokenizer: str, device: str) -> dict:
    """A random-init bf16 Llama of ``shape`` with SmolLM2's vocabulary and tokenizer, saved in ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, **json.loads(shape))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer) / name).is_file():
            shutil.copy(Path(tokenizer) / name, Path(folder) / name)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "bytes_16bit": sum(p.numel() * p.element_size() for p in model.parameters())}


def child_reload(checkpoint: str, device: str) -> dict:
    """Plain ``from_pretrained`` of the exported checkpoint on ``device``, its 4-bit modules and a short greedy text."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=device)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    inputs = tokenizer("The capital of France is", return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    blocksizes = sorted({m.weight.quant_state.blocksize for m in four_bit if m.weight.quant_state is not None})
    return {"linear4bit": len(four_bit), "blocksizes": blocksizes, "footprint_bytes": model.get_memory_footprint(),
            "generated_tokens": int(out.shape[1] - inputs["input_ids"].shape[1]),
            "device": str(next(model.parameters()).device)}


def child_resume(folder: str, device: str, samples: str, seq_len: str) -> dict:
    """The default analysis (Fisher, the blocksize menu) on ``device``, stopped by Ctrl-C at the second forward of its
    first layer (the second batch, or the first one's second micro-batch) and resumed: the running batch finishes, the
    interrupt's own save runs (no periodic save before it), and the resumed statistics are read onto the CPU. Per score
    column against an uninterrupted run: the largest relative difference and the rows finite in one run only; and the
    token counts. On CUDA ``output_fisher_error`` may differ in the last bits (the attention backward's kernels need
    not be deterministic); the other columns come from forward products and saved sums."""
    import signal

    import numpy as np
    import torch

    from quantplan.analysis import (
        analyze,
        load_calibration,
        load_model,
        load_processor,
        parse_formats,
        resolve_source,
    )

    signal.signal(signal.SIGINT, signal.default_int_handler)  # delivered even if this process was started ignoring it
    source = resolve_source(folder)
    model = load_model(source, dtype=torch.bfloat16, device=device)
    calibration = load_calibration(load_processor(source), None, int(samples), int(seq_len))
    common = {"batch_size": 4, "progress": False, "fisher": True, "model_fingerprint": source.fingerprint}
    formats = parse_formats("nf4,nf4-bs32")
    whole = analyze(model, calibration, formats, **common).df
    calls = []

    def press_ctrl_c(module, args, output):
        calls.append(len(calls))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    handle = model.model.layers[0].register_forward_hook(press_ctrl_c)
    with tempfile.TemporaryDirectory(prefix="quantplan-resume-") as out:
        try:
            analyze(model, calibration, formats, out_dir=out, checkpoint_seconds=1e9, **common)
        except KeyboardInterrupt:
            pass
        else:
            return {"stopped": False, "batches": calibration.num_batches(4)}  # nothing to resume: too few batches
        finally:
            handle.remove()
        saved = json.loads((Path(out) / "partial" / "state.json").read_text())["batches_done"]
        resumed = analyze(model, calibration, formats, out_dir=out, resume=True, **common).df
    differences, finite_in_one = {}, {}
    for column in ["weight_rel_error", "output_rel_error", "output_mse", "output_fisher_error"]:
        a, b = whole[column].to_numpy(float), resumed[column].to_numpy(float)
        both = np.isfinite(a) & np.isfinite(b)
        finite_in_one[column] = int((np.isfinite(a) != np.isfinite(b)).sum())
        relative = np.abs(a[both] - b[both]) / np.maximum(np.abs(a[both]), 1e-30)
        differences[column] = float(np.max(relative, initial=0.0))
    return {"stopped": True, "batches_saved": saved, "batches": calibration.num_batches(4),
            "same_rows": list(whole["name"]) == list(resumed["name"]),
            "same_tokens": list(whole["tokens"]) == list(resumed["tokens"]), "max_rel_difference": differences,
            "finite_in_one_run_only": finite_in_one}


def child_measure_work(device: str) -> dict:
    """Peak device memory of ``measure_module`` (NF4 round trip + error sums) per weight element, beside the weight."""
    import torch

    from quantplan.analysis.formats import NF4
    from quantplan.analysis.measure import measure_module
    from quantplan.analysis.modules import ModuleInfo

    if not device.startswith("cuda"):
        return {"skipped": "the device's allocator is measured on CUDA only"}
    out = {}
    for rows, cols in WORK_SHAPES:
        weight = (torch.randn(rows, cols, device=device) * 0.02).to(torch.bfloat16)
        info = ModuleInfo(f"w{rows}x{cols}", "g", 0, "Linear", "mlp", rows, cols, True)
        measure_module(info, weight, None, [NF4], None)  # warm-up: kernels and their work buffers
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        measure_module(info, weight, None, [NF4], None)
        torch.cuda.synchronize()
        out[f"{rows}x{cols}"] = {"bytes_per_param": (torch.cuda.max_memory_allocated() - base) / weight.numel(),
                                 "seconds": time.perf_counter() - start}
    return out


def _offline_tokenizer() -> Path:
    from quantplan.analysis import resolve_source

    return Path(resolve_source(None).path)


def _gpu() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_bytes": props.total_memory, "torch": torch.__version__,
            "cuda": torch.version.cuda}


def _stage_figures(step: dict) -> dict:
    """Seconds and peak GPU memory per top-level stage of a run's profile."""
    stages = step.get("profile", {}).get("stages", [])
    return {s["name"]: (s["seconds"], s.get("peak_gpu_bytes")) for s in stages if s.get("depth", 0) == 0}


def _print_table(result: dict) -> None:
    gpu = result["gpu"]["name"] if result["gpu"] else result["device"]
    print(f"\nGPU check on {gpu}, total {result['total_s']:.0f} s")
    print(f"measure_module work space: {json.dumps(result['measure_work'])}")
    print("| model | step | ok | wall s | analysis s | peak GPU GB (analysis) | peak GPU GB (whole) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, model in result["models"].items():
        for label, step in model["steps"].items():
            stages = _stage_figures(step)
            analysis = stages.get("analysis", (None, None))
            peaks = [p for _, p in stages.values() if p]
            print(f"| {name} | {label} | {step['ok']} | {step.get('wall_s', 0):.1f} | "
                  f"{analysis[0] or 0:.1f} | {(analysis[1] or 0) / 1e9:.3f} | {max(peaks, default=0) / 1e9:.3f} |")
        print(f"agreement {name}: {json.dumps(model['agreement'])}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(globals()[f"child_{sys.argv[2]}"](*sys.argv[3:])))
    else:
        sys.exit(main())
