"""The exported checkpoint's README.md: what was kept 16-bit and why, sizes, how to load it."""

from __future__ import annotations

import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from quantplan.common.sizes import format_bytes

from .compat import cost_note, cost_rows, format_rows, name_rows, skip_list_sentence, vllm_sentence
from .plan_types import KEEP


def _md_table(rows: list[dict]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(f"`{v}`" if isinstance(v, str) and "." in v and any(ch.isalpha() for ch in v) and " " not in v else str(v)
                                for v in row.values()) + " |" for row in rows]
    return "\n".join(lines)


def _device_text(plan) -> str:
    """The device budget split (``--kv-context``): weights + KV cache + activations."""
    if (d := plan.device) is None:
        return ""
    weights = plan.predicted.bytes
    return f"""
Planned for a device budget of `{d.spec}` ({format_bytes(d.bytes)}) holding {d.batch} sequence(s) of
{d.context} tokens:

| device memory | bytes |
|---|---|
| weights (predicted) | {format_bytes(weights)} |
| KV cache (16-bit, {d.batch} x {d.context} tokens) | {format_bytes(d.kv_cache_bytes)} |
| activations (prefill allowance) | {format_bytes(d.activation_bytes)} |
| total | {format_bytes(weights + d.kv_cache_bytes + d.activation_bytes)} |
"""


def compat_text(plan) -> str:
    """The loader compatibility section: vLLM-safe, --vllm-safe's cost, skip list names, per-module formats."""
    parts = [vllm_sentence(plan)]
    if costs := cost_rows(plan):
        parts.append("The same table planned at the same weight budget without and with `--vllm-safe` "
                     f"(predicted from the table, no extra model run).{cost_note(plan)}\n\n"
                     + _md_table([{**r, "predicted bytes": format_bytes(r["predicted bytes"])} for r in costs]))
    names = name_rows(plan)
    if names:
        parts.append("transformers 5 names the live modules differently from the checkpoint's tensors, which "
                     "vLLM reads; `config.json` holds the live names. The skip list in both name spaces:\n\n"
                     + _md_table(names))
    elif plan.compat is not None:
        parts.append("The skip list's names are the same for transformers and in the checkpoint (vLLM).")
    if skip_only := skip_list_sentence(plan):
        parts.append(skip_only)
    if formats := format_rows(plan):
        parts.append(f"This plan mixes 4-bit formats; per module:\n\n{_md_table(formats)}")
    return "\n\n".join(parts)


def _made_by() -> str:
    """Which tool wrote the card: the installed quantplan's version (no link: the project has no public page)."""
    try:
        return f"quantplan {version('quantplan')}"
    except PackageNotFoundError:  # a checkout imported without installing
        return "quantplan"


def _checks_text(plan) -> str:
    """The end-to-end refinement and verification, when they ran (planner.refine, planner.verify)."""
    lines = []
    if refinement := plan.checks.refinement:
        why = f" automatically ({refinement.trigger.sentence})" if refinement.trigger else ""
        lines.append(f"Refined{why} in {refinement.rounds} rounds of measured KL gradients on "
                     f"{refinement.tokens} calibration tokens" + ("." if refinement.shipped else
                                                                 "; the refined plan measured worse, so the first "
                                                                 "plan ships.") + _heldback_text(refinement))
    if verification := plan.checks.verification:
        kld = verification.calibration_kld
        measured = ", ".join(f"{label} {value:.4g}" for label, value in kld.items())
        lines.append(f"Checked on {verification.tokens} calibration tokens (mean KL divergence from 16-bit, "
                     f"nats/token: {measured}); shipped: {verification.chosen}.")
    return "\n" + "\n\n".join(lines) + "\n" if lines else ""


def _heldback_text(refinement) -> str:
    """The held-back comparison that chose between the refined and the first plan, when one ran."""
    if not refinement.heldback_kld:
        return ""
    kld = refinement.heldback_kld
    return (f" Chosen on {refinement.heldback_tokens} held-back calibration tokens the refinement did not fit "
            f"(KL {kld['refined']:.4g} refined, {kld['first plan']:.4g} first plan).")


#: LoRA on the attention and MLP projections (Llama, Qwen, Mistral, ... names)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def qlora_text(source) -> str:
    """The card's QLoRA section: a PEFT LoRA adapter on the export and one training step (tested as is)."""
    from transformers import AutoConfig

    from quantplan.analysis.vision import is_vision_language

    auto = ("AutoModelForImageTextToText" if is_vision_language(AutoConfig.from_pretrained(source.path))
            else "AutoModelForCausalLM")
    return f"""## Fine-tune (QLoRA)

The 4-bit modules are bitsandbytes `Linear4bit` and the kept ones plain `nn.Linear`; PEFT wraps both:

```python
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoTokenizer, {auto}

path = "path/to/this/folder"
model = prepare_model_for_kbit_training({auto}.from_pretrained(path, device_map="auto"))
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                         target_modules={list(LORA_TARGETS)}))
tokenizer = AutoTokenizer.from_pretrained(path)
batch = tokenizer(["Your training text."], return_tensors="pt").to(model.device)
loss = model(**batch, labels=batch["input_ids"]).loss  # one step; use your trainer of choice
loss.backward()
torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4).step()
```
"""


def _formats_text(plan) -> str:
    """Modules per format; for a blocksize menu the full per-module list and which loaders read it."""
    counts = {t: sum(1 for c in plan.choices.values() if c == t) for t in plan.used_formats}
    described = ", ".join(f"{counts[t]} in `{t}` (blocksize {plan.format_of(t).get('blocksize', 64)})" for t in counts)
    text = f"\n## Formats\n\n4-bit modules: {described or 'none'}; {len(plan.kept)} in 16-bit.\n"
    if not plan.mixed_blocksizes:
        return text
    rows = "\n".join(f"| `{n}` | {c} |" for n, c in plan.choices.items() if c != KEEP and c != plan.tiers[0])
    return text + f"""
Modules carry **different NF4 blocksizes**, each stored in its own saved `quant_state`
(pre-quantized bitsandbytes layout). Loaders known to read per-tensor blocksizes:
transformers >= 5 (`from_pretrained`, verified by quantplan on this checkpoint: every module's
`weight.quant_state.blocksize` matched the plan; on CUDA too, where quantplan's GPU check loaded and ran
such checkpoints); vLLM's bitsandbytes loader reads each tensor's
quant state too (per its loader code; untested here). Tools that rebuild a checkpoint from a
`BitsAndBytesConfig` alone would use blocksize 64 everywhere.

<details><summary>modules not in `{plan.tiers[0]}` ({sum(1 for c in plan.choices.values() if c not in (KEEP, plan.tiers[0]))})</summary>

| module | format |
|---|---|
{rows}

</details>
"""


def _bare_text(plan) -> str:
    """A paragraph on the matrices no Linear holds (fused MoE experts), 16-bit in this checkpoint as in any
    bitsandbytes load; empty where there are none."""
    if not plan.bare_matrices:
        return ""
    params = sum(math.prod(shape) for shape in plan.bare_matrices.values())
    share = params * 2 / plan.predicted.bytes_16bit if plan.predicted.bytes_16bit else 0.0
    first = next(iter(plan.bare_matrices))
    return (f"\n{len(plan.bare_matrices)} weight matrices belong to no Linear ({params:,} parameters, {share:.0%} of "
            f"the 16-bit model; e.g. `{first}`, such as fused MoE experts): bitsandbytes does not quantize them, so "
            "they are 16-bit here, as in any bitsandbytes 4-bit load.\n")


def _equalized_text(plan) -> str:
    """Where the weights were channel-scaled (:mod:`analysis.equalize`): what differs from the source, and what it
    means for adapters; empty otherwise."""
    if not plan.equalized or not plan.used_formats:
        return ""
    groups = plan.equalization["groups"]
    return (f"\n**Channel-scaled weights.** Before quantizing, {len(groups)} inputs were equalized: power-of-two "
            "scales between each norm and the Linears it feeds, and between `up_proj` and `down_proj`, chosen from the "
            "activations' size (`quantplan_plan.json`, `equalization`). The 16-bit function is unchanged to the last "
            "bit, the 4-bit error is lower. So this checkpoint's norm weights, `up_proj` rows and the Linears' input "
            "columns differ from the source's: LoRA adapters trained on this checkpoint apply to it (and to its "
            "de-quantized weights), not to the source model's. `quantplan run --no-equalize` keeps the source "
            "weights.\n")


def _yourself(plan) -> str:
    """What the pasteable config below gives when applied to the source model."""
    if plan.equalized:
        return ("the config below gives only the skip list: over the original model's weights (not channel-scaled) "
                "it makes another model than this one")
    return ("to quantize the original model " + ("with the same skip list (at blocksize 64 only)"
                                                  if plan.mixed_blocksizes else "the same way") + " yourself")


def _plain_text(plan) -> str:
    """Where the budget reached the 16-bit size: the checkpoint is plain 16-bit, whatever the sections below say."""
    if plan.used_formats:
        return ""
    return ("\n**This checkpoint is plain 16-bit:** the budget reached the 16-bit size, so every module stayed 16-bit "
            "and `config.json` holds no quantization config; what follows about 4-bit modules does not apply.\n")


def write_model_card(path: Path, source, plan, result) -> None:
    """Write a Hugging Face model card for a dynamic-bnb-4bit export."""
    predicted = plan.predicted
    kept_rows = "\n".join(f"| `{n}` | {plan.reasons[n].text} |" for n in plan.kept)
    fmt = "+".join(plan.used_formats) if plan.mixed_blocksizes else plan.quant.get("name", "nf4")
    tags = "\n".join(f"- {t}" for t in (plan.used_formats if plan.mixed_blocksizes else [fmt]))
    footprint_gap = result.footprint_bytes / predicted.footprint_bytes - 1 if predicted.footprint_bytes else 0
    text = f"""---
base_model: {source.model_id}
library_name: transformers
tags:
- bitsandbytes
- 4-bit
{tags}
- dynamic-bnb-4bit
- quantplan
---

# {source.short_name} — dynamic bnb 4-bit ({fmt}, {len(plan.kept)} modules kept 16-bit)

Made by {_made_by()} from `{source.model_id}`: every Linear is
bitsandbytes {fmt.upper()} (double quant: {plan.quant.get('double_quant', True)}) except the
{len(plan.kept)} modules below, which stay 16-bit. They were chosen by measuring each module's
output error on calibration data and solving exactly for the least predicted error within the
budget `{plan.budget.spec}` ({format_bytes(plan.budget.bytes)}); objective: `{plan.objective}`.
{_bare_text(plan)}{_plain_text(plan)}{_equalized_text(plan)}
## Size

| | bytes |
|---|---|
| predicted checkpoint size | {format_bytes(predicted.bytes)} |
| actual checkpoint tensors | {format_bytes(result.checkpoint_bytes)} |
| predicted `get_memory_footprint()` | {format_bytes(predicted.footprint_bytes)} |
| actual `get_memory_footprint()` | {format_bytes(result.footprint_bytes)} ({footprint_gap:+.2%}) |
| all-4-bit model | {format_bytes(predicted.bytes_all_4bit)} |
| 16-bit model | {format_bytes(predicted.bytes_16bit)} |

Predicted summed error: {predicted.error:.4g} (all-4-bit: {predicted.error_all_4bit:.4g}).
{_device_text(plan)}{_checks_text(plan)}{_formats_text(plan)}
## Loader compatibility

{compat_text(plan)}

## Load

```python
from transformers import AutoModelForCausalLM  # or the model's own Auto class
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", device_map="auto")
```

The quantization config (with the skip list) is stored in `config.json`; {_yourself(plan)}:

```python
{plan.bnb_config_code().strip()}
```

{qlora_text(source)}
## Modules kept in 16-bit

| module | reason |
|---|---|
{kept_rows}

Full per-module choices and reasons: `quantplan_plan.json`.
"""
    if source.model_id.endswith("SmolLM2-135M-Instruct") and source.fingerprint.startswith("gguf:"):
        text += ("\n**Note:** this offline demo model was de-quantized from a Q4_1 GGUF file, so its "
                 "'16-bit' baseline is already coarse.\n")
    path.write_text(text)
