"""How long does ``quantplan export`` take compared with transformers' own bitsandbytes load + save?

On the offline default model (SmolLM2-135M, bf16 folder, CPU, one torch thread) this times:

* ``transformers``: ``from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  nf4, double quant, bf16 compute, llm_int8_skip_modules=<the plan's skip list>), device_map="cpu")``
  then ``save_pretrained`` (model only); ``transformers+tokenizer`` also loads and saves the
  tokenizer, without which the checkpoint is not usable;
* ``quantplan``: ``planner.export.export`` of a +10 % plan for the same model, which does the
  same load and save, then writes the tokenizer, plan and model card, **reloads the saved
  checkpoint with plain ``from_pretrained`` to verify it** and moves it into place. Its parts
  are timed by wrapping ``_load_quantized``, ``_load_plain`` (the verification reload) and
  ``write_model_card`` at run time (the library is not modified).

The plan comes from a small analysis (4 x 64 tokens, nf4, no Fisher): its skip list is what
matters here, not its quality. Each variant runs ``--repeats`` times, alternating, best kept;
wall and CPU time. Target (issue #6): quantplan / transformers <= 1.2x. Results:
``benchmarks/results/export_time.json``.

    python benchmarks/export_time.py [--model FOLDER] [--repeats 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

from quantplan.analysis import NF4, analyze, load_calibration, load_model, load_processor, resolve_source  # noqa: E402
from quantplan.planner import plan  # noqa: E402

export_module = importlib.import_module("quantplan.planner.export")
RESULTS = Path(__file__).resolve().parent / "results" / "export_time.json"
TARGET = 1.2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="model folder or hub id (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    source = resolve_source(args.model)
    chosen = _plan(source)
    runs = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="quantplan-export-") as work:
        for repeat in range(args.repeats):
            for name, fn in (("transformers", _transformers), ("transformers+tokenizer", _with_tokenizer),
                             ("quantplan", _quantplan)):
                target = Path(work) / f"{name}-{repeat}"
                runs[name].append(fn(source, chosen, target))
                shutil.rmtree(target, ignore_errors=True)
                gc.collect()
                print(name, json.dumps(runs[name][-1]))
    best = {name: min(r, key=lambda x: x["wall_s"]) for name, r in runs.items()}
    summary = {
        "ratio_wall": best["quantplan"]["wall_s"] / best["transformers"]["wall_s"],
        "ratio_cpu": min(r["cpu_s"] for r in runs["quantplan"]) / min(r["cpu_s"] for r in runs["transformers"]),
        "ratio_wall_vs_transformers_with_tokenizer":
            best["quantplan"]["wall_s"] / best["transformers+tokenizer"]["wall_s"],
        "ratio_wall_without_verification_reload":
            (best["quantplan"]["wall_s"] - best["quantplan"]["parts"].get("verification_reload", 0.0))
            / best["transformers"]["wall_s"],
        "target": TARGET,
    }
    summary["target_met"] = summary["ratio_wall"] <= TARGET
    result = {"machine": machine_info(threads=1), "model": source.model_id, "kept": len(chosen.kept),
              "quantized": len(chosen.choices) - len(chosen.kept), "runs": runs, "best": best, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def _plan(source):
    model = load_model(source)
    calibration = load_calibration(load_processor(source), samples=4, seq_len=64)
    table = analyze(model, calibration, [NF4], model_fingerprint=source.fingerprint, progress=False)
    del model
    gc.collect()
    return plan(table, "+10%")


def _transformers(source, chosen, target: Path) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    start, cpu = time.perf_counter(), time.process_time()
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=list(chosen.skip_modules))
    model = AutoModelForCausalLM.from_pretrained(source.path, quantization_config=config, dtype=torch.bfloat16,
                                                 device_map="cpu")
    loaded = time.perf_counter() - start
    model.save_pretrained(target)
    return {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
            "parts": {"load_quantized": loaded}}


def _with_tokenizer(source, chosen, target: Path) -> dict:
    """The baseline plus the tokenizer a usable checkpoint needs (quantplan's export saves it too)."""
    from transformers import AutoTokenizer

    start, cpu = time.perf_counter(), time.process_time()
    run = _transformers(source, chosen, target)
    AutoTokenizer.from_pretrained(source.path).save_pretrained(target)
    return {**run, "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


def _quantplan(source, chosen, target: Path) -> dict:
    parts = defaultdict(float)
    wrapped = [("_load_quantized", "load_quantized"), ("_load_plain", "verification_reload"),
               ("write_model_card", "model_card")]
    start, cpu = time.perf_counter(), time.process_time()
    with _timed(export_module, wrapped, parts):
        export_module.export(source, chosen, target)
    return {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "parts": dict(parts)}


@contextmanager
def _timed(module, names, parts):
    originals = {attr: getattr(module, attr) for attr, _ in names}

    def wrap(fn, key):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[key] += time.perf_counter() - t
        return timed

    for attr, key in names:
        setattr(module, attr, wrap(originals[attr], key))
    try:
        yield
    finally:
        for attr, fn in originals.items():
            setattr(module, attr, fn)


if __name__ == "__main__":
    sys.exit(main())
