"""The exported checkpoint's README.md: what was kept 16-bit and why, sizes, how to load it."""

from __future__ import annotations

from pathlib import Path

from .budget import format_bytes
from .plan_types import KEEP


def _checks_text(plan) -> str:
    """The end-to-end refinement and verification, when they ran (planner.refine, planner.verify)."""
    lines = []
    if refinement := plan.checks.refinement:
        lines.append(f"Refined in {refinement.rounds} rounds of measured KL gradients on "
                     f"{refinement.tokens} calibration tokens.")
    if verification := plan.checks.verification:
        kld = verification.calibration_kld
        measured = ", ".join(f"{label} {value:.4f}" for label, value in kld.items())
        lines.append(f"Checked on {verification.tokens} calibration tokens (mean KL divergence from 16-bit, "
                     f"nats/token: {measured}); shipped: {verification.chosen}.")
    return "\n" + "\n\n".join(lines) + "\n" if lines else ""


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
`weight.quant_state.blocksize` matched the plan); vLLM's bitsandbytes loader reads each tensor's
quant state too (per its loader code; untested here). Tools that rebuild a checkpoint from a
`BitsAndBytesConfig` alone would use blocksize 64 everywhere.

<details><summary>modules not in `{plan.tiers[0]}` ({sum(1 for c in plan.choices.values() if c not in (KEEP, plan.tiers[0]))})</summary>

| module | format |
|---|---|
{rows}

</details>
"""


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

Made by [quantplan](https://github.com/) from `{source.model_id}`: every Linear is
bitsandbytes {fmt.upper()} (double quant: {plan.quant.get('double_quant', True)}) except the
{len(plan.kept)} modules below, which stay 16-bit. They were chosen by measuring each module's
output error on calibration data and solving exactly for the least predicted error within the
budget `{plan.budget.spec}` ({format_bytes(plan.budget.bytes)}); objective: `{plan.objective}`.

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
{_checks_text(plan)}{_formats_text(plan)}
## Load

```python
from transformers import AutoModelForCausalLM  # or the model's own Auto class
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", device_map="auto")
```

The quantization config (with the skip list) is stored in `config.json`; to quantize the
original model {"with the same skip list (at blocksize 64 only)" if plan.mixed_blocksizes else "the same way"} yourself:

```python
{plan.bnb_config_code().strip()}
```

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
