"""analyze_streaming(): the same sensitivity table as analyze(), one block in memory at a time.

For a decoder LLM saved as safetensors (``model.model.layers``: Llama, SmolLM2, Qwen2, Mistral
...), the loop is llm-compressor's sequential pipeline:

1. build the model on the meta device (no weights in memory);
2. stage 0: load the embeddings, run each calibration batch up to the first decoder layer and
   keep what that layer receives (hidden states + keyword arguments: position embeddings,
   mask); measure the embedding rows;
3. stage 1..L: load block i from the memory-mapped safetensors, run every batch through it
   with the input probes attached (:mod:`analysis.probe`), measure its Linears exactly as
   ``analyze()`` does (:mod:`analysis.measure`), write the outputs for the next block, free
   the block and its statistics;
4. last stage: final norm + lm_head the same way.

Resident memory is one stage's weights, its input statistics and one batch; activations
carried between blocks live on disk (:mod:`analysis.stream_store`), which also makes every
finished block a checkpoint that ``resume=True`` continues from. Fisher scores need a
backward pass through the whole model and are not available here: the planner's ``auto``
objective then uses output error.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from quantplan.common.sizes import parse_size

from .analyze import CONTEXT_COLUMNS, PARTIAL_DIR, _reason, _table_meta
from .distributed import Shard
from .formats import NF4, format_to_dict
from .measure import measure_module
from .models import resolve_source
from .modules import list_modules, output_embedding_name
from .probe import InputProbe
from .stream_store import StreamCheckpoint, read_batch, write_batch
from .stream_weights import (
    DiskWeights,
    StreamingUnsupported,
    release_freed_blocks,
    skeleton,
    stage_need,
    unload,
)
from .table import SensitivityTable


@dataclass
class Stage:
    """One unit of streaming: the parameters it loads and how it runs a batch."""

    label: str
    kind: str  # embed | layer | head
    params: list[str]
    layer: torch.nn.Module | None = None
    linears: list[str] = field(default_factory=list)  # modules measured in this stage


def analyze_streaming(path, calibration, formats=(NF4,), *, max_memory: str | int | None = None,
                      dtype: torch.dtype = torch.bfloat16, model_id: str | None = None,
                      model_fingerprint: str | None = None, batch_size: int = 4, out_dir: str | Path | None = None,
                      resume: bool = False, progress: bool = True, fisher: bool = False) -> SensitivityTable:
    """Measure the model saved in ``path`` block by block; returns the table ``analyze()`` would.

    ``max_memory`` (``"2GB"``, ``"1500MiB"``, bytes) is checked against the largest stage's
    estimated need before anything runs. With ``out_dir`` every finished block is checkpointed
    in ``out_dir/partial`` and ``resume=True`` continues from the last one.
    """
    if fisher:
        raise StreamingUnsupported(
            "Fisher scores need a backward pass through the whole model, which streaming analysis does not run: "
            "pass --no-fisher (fisher=False) with --max-memory; plans then use the output-error objective")
    if Shard.current().world > 1:
        raise StreamingUnsupported("streaming analysis runs in one process: launch it without torchrun, or drop "
                                   "--max-memory to share the calibration batches between processes")
    formats = list(formats)
    release_freed_blocks()
    model = skeleton(path, dtype)
    weights = DiskWeights(path, model)
    infos = list_modules(model)
    lm_head = output_embedding_name(model)
    reasons = {i.name: _reason(model, i, lm_head, formats) for i in infos}
    candidates = [i.name for i in infos if reasons[i.name] is None]
    stages = _stages(model, infos, lm_head)
    if max_memory is not None:
        _check_fits(model, stages, candidates, parse_size(max_memory), calibration, batch_size)
    fingerprint = model_fingerprint or resolve_source(str(path)).fingerprint
    run_meta = {"model_fingerprint": fingerprint, "calibration": calibration.meta,
                "formats": [format_to_dict(f) for f in formats], "batch_size": batch_size,
                "candidates": candidates, "dtype": str(dtype), "streaming": True}
    meta = _table_meta(model, model_id, fingerprint, calibration, formats, infos, False)  # before ties break
    scratch = None if out_dir else tempfile.TemporaryDirectory(prefix="quantplan-stream-")
    store = StreamCheckpoint(Path(out_dir) / PARTIAL_DIR if out_dir else Path(scratch.name) / PARTIAL_DIR, run_meta)
    done, rows = store.start(resume)
    for index in tqdm(range(done, len(stages)), desc="streamed blocks", disable=not progress):
        stage = stages[index]
        weights.load(model, stage.params, dtype)
        try:
            outputs = store.output_folder(index) if index < len(stages) - 1 else None
            probe = InputProbe(model, [n for n in stage.linears if n in candidates])
            _run_stage(model, stage, probe, calibration, batch_size, store.hidden(index), outputs)
            rows[index] = _measure_stage(model, stage, infos, probe, formats, reasons)
        finally:
            unload(model, stage.params)
        store.commit(index, rows[index], outputs)
    table = SensitivityTable(pd.DataFrame(_in_module_order(rows, infos)), meta)
    if out_dir:
        table.save(out_dir)
    store.remove()
    if scratch:
        scratch.cleanup()
    return table


def _in_module_order(rows: dict[int, list[dict]], infos) -> list[dict]:
    """All stages' rows in module-tree order, as analyze() lists them."""
    by_name: dict[str, list[dict]] = {}
    for stage_rows in rows.values():
        for row in stage_rows:
            by_name.setdefault(row["name"], []).append(row)
    return [row for info in infos for row in by_name[info.name]]


def _stages(model, infos, lm_head) -> list[Stage]:
    """Embeddings, each decoder layer, then final norm + lm_head, with the parameters of each."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not hasattr(base, "norm") or lm_head is None:
        raise StreamingUnsupported(
            f"streaming analysis handles decoder LLMs laid out as model.layers + model.norm + lm_head "
            f"(Llama, Qwen2, Mistral, ...), not {type(model).__name__}: run without --max-memory")
    layer_types = set(getattr(model.config, "layer_types", None) or [])
    if len(layer_types) > 1:
        raise StreamingUnsupported(
            f"this model mixes attention types across layers ({sorted(layer_types)}), whose masks differ by "
            f"layer; streaming analysis carries one mask: run without --max-memory")
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    layer_prefixes = [f"model.layers.{i}." for i in range(len(layers))]
    in_layers = {n for n in names if n.startswith("model.layers.")}
    embed = [n for n in names if n.startswith("model.") and n not in in_layers and not n.startswith("model.norm.")]
    head = [n for n in names if n not in in_layers and n not in embed]
    stages = [Stage("embeddings", "embed", embed)]
    stages += [Stage(f"layer {i}", "layer", [n for n in names if n.startswith(p)], layers[i])
               for i, p in enumerate(layer_prefixes)]
    stages.append(Stage("norm + lm_head", "head", head))
    for stage in stages:
        owned = set(stage.params)
        stage.linears = [i.name for i in infos if i.name + ".weight" in owned]
    return stages


class _Captured(Exception):
    """Raised by the first decoder layer's pre-hook once it has seen its inputs."""


def _run_stage(model, stage: Stage, probe: InputProbe, calibration, batch_size, inputs: Path, outputs: Path | None):
    """Run every calibration batch through one stage with the probes attached; write the outputs."""
    if stage.kind == "head" and not probe.names:
        return  # lm_head is not measured (tied): nothing in this stage needs the activations
    with probe.attached(), torch.inference_mode():
        for index, batch in enumerate(calibration.batches(batch_size)):
            probe.start_batch()
            if stage.kind == "embed":
                hidden, kwargs = _capture_first_layer_inputs(model, batch)
            else:
                hidden, kwargs = read_batch(inputs, index)
                hidden = _run_layer(model, stage, hidden, kwargs)
            probe.commit_batch()
            if outputs is not None:
                write_batch(outputs, index, hidden, kwargs)


def _capture_first_layer_inputs(model, batch: dict):
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.model(**batch, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


def _run_layer(model, stage: Stage, hidden, kwargs):
    if stage.kind == "head":
        model.lm_head(model.model.norm(hidden))
        return hidden
    out = stage.layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _measure_stage(model, stage: Stage, infos, probe: InputProbe, formats, reasons) -> list[dict]:
    """Rows of the stage's modules, computed as analyze() computes them."""
    weights = dict(model.named_parameters(remove_duplicate=False))
    rows = []
    for info in infos:
        if info.name in stage.linears:
            stats = probe.stats_for(info.name) if info.name in probe.owner else None
            rows.extend(measure_module(info, weights[info.name + ".weight"], stats, formats, reasons[info.name]))
    for row in rows:  # the quantized-context pass runs the whole model: not available here
        row.update({c: float("nan") for c in CONTEXT_COLUMNS})
    return rows


def _check_fits(model, stages, candidates, cap: int, calibration, batch_size) -> None:
    """Refuse, naming the fix, when the largest stage cannot fit under ``max_memory``."""
    seq_len = calibration.meta.get("seq_len", 0)
    needs = [(stage_need(model, s.params, [n for n in s.linears if n in candidates], batch_size * seq_len,
                         batch_size), s) for s in stages]
    need, stage = max(needs, key=lambda pair: pair[0]["total"])
    if need["total"] > cap:
        gb = 1e9
        raise StreamingUnsupported(
            f"--max-memory {cap / gb:.2f} GB is too small: streaming holds one block at a time, and the largest "
            f"({stage.label}) needs about {need['total'] / gb:.2f} GB (weights {need['weights'] / gb:.2f} GB, input "
            f"statistics {need['statistics'] / gb:.2f} GB, work space {need['work'] / gb:.2f} GB): pass "
            f"--max-memory {need['total'] / gb + 0.01:.2f}GB or more, or a smaller --batch-size")
