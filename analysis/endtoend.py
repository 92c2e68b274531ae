"""End-to-end probes: how far the quantized model's next-token distribution drifts from 16-bit, and which
module's rounding drives that drift in the context of all the others.

The 16-bit model's logits on the calibration batches come from a
:class:`~analysis.reference.KLReference`, one batch at a time;
:func:`~analysis.reference.calibration_klds` measures the mean next-token KL divergence of
variants of the model (some weights swapped for bitsandbytes' round trip by
:class:`~analysis.simulate.QuantCache`). Against it:

- :func:`restore_gains` runs, per batch, the 16-bit forward (the reference logits of that batch)
  and one forward and backward pass of the KL with the named modules quantized, and gives every quantized module i the first-order decrease of the KL if
  it alone went back to 16-bit: ``gain_i = −⟨∂KL/∂W_i, W_i − Ŵ_i⟩``. Measured with every module
  quantized this is the *quantized-context* score: the module's input carries all upstream
  rounding and its gradient all downstream rounding, so propagation and interaction are in it
  (the local output error and the Fisher score see one module in an otherwise 16-bit model).
  Re-measured after restoring some modules, it is what the planner's refinement iterates on.
  In the same pass, forward hooks record each quantized module's own output error on the
  inputs of the quantized model, ``‖(W−Ŵ)x̂‖² / ‖Wx̂‖²``.

Along the straight path from 16-bit to all-quantized the KL grows about quadratically, so the
gains of all modules add up to about twice the KL (a module's gain counts its interactions with
every other module); they rank modules, the KL itself is measured by
:func:`~analysis.reference.calibration_kld`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .reference import KLReference, forward_logits, kl_sum


@dataclass
class RestoreGains:
    """Result of :func:`restore_gains` (gains in nats per token, first order)."""

    kld: float  # mean KL of the model with the quantized modules, measured in the same pass
    gains: dict[str, float] = field(default_factory=dict)  # module -> first-order KL decrease if restored (NaN:
    # no gradient reached it)
    context_error: dict[str, float] = field(default_factory=dict)  # module -> ‖(W−Ŵ)x̂‖² / ‖Wx̂‖²


def restore_gains(model, reference: KLReference, cache, quantized, *, context_error: bool = False,
                  progress: bool = False) -> RestoreGains:
    """First-order KL decrease from restoring each module of ``quantized`` (see module docstring).

    ``cache`` is an :class:`~analysis.simulate.QuantCache` of ``model``; the modules in
    ``quantized`` compute with their round-tripped weights during the pass, every other
    module with its 16-bit weight. Weights are not trained: their gradients are consumed by a
    hook per module as soon as they are accumulated, so at most one weight gradient is alive.
    """
    quantized = list(quantized)
    gains = {n: torch.zeros((), dtype=torch.float64) for n in quantized}
    reached: set[str] = set()
    errors = {n: torch.zeros(2, dtype=torch.float64) for n in quantized} if context_error else {}
    total = 0.0
    with _weights_require_grad(model, cache, quantized, gains, reached):
        for batch in tqdm(reference.batches(), total=reference.count, desc="quantized-context gradients",
                          disable=not progress, leave=False):
            logits16 = reference.logits16(batch)  # 16-bit weights here; this batch's logits only
            with cache.quantized(quantized), _context_error_hooks(cache, errors), torch.enable_grad():
                kl = kl_sum(logits16, forward_logits(model, batch), batch)
                (kl / reference.tokens).backward()
            total += float(kl.detach())
            del logits16, kl
    return RestoreGains(
        kld=total / max(reference.tokens, 1),
        gains={n: float(g) if n in reached else float("nan") for n, g in gains.items()},
        context_error={n: float(e[0] / e[1]) if e[1] > 0 else float("nan") for n, e in errors.items()},
    )


@contextmanager
def _weights_require_grad(model, cache, names, gains, reached):
    """Only the named weights get gradients; each is folded into its gain and freed on arrival
    (a module no gradient reached keeps no gain: NaN, not a misleading zero)."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    handles = []
    for name in names:
        weight = cache.modules[name].weight
        weight.requires_grad_(True)
        handles.append(weight.register_post_accumulate_grad_hook(_fold_gradient(cache, name, gains, reached)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name in names:
            weight = cache.modules[name].weight
            weight.grad = None
            weight.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)


def _fold_gradient(cache, name, gains, reached):
    def hook(weight):
        reached.add(name)
        with torch.no_grad():
            delta = cache.original(name).float() - weight.detach().float()  # W − Ŵ: the step back to 16-bit
            gains[name] -= (weight.grad.float() * delta).sum(dtype=torch.float64).cpu()
        weight.grad = None

    return hook


@contextmanager
def _context_error_hooks(cache, errors):
    """Forward hooks summing ‖(W−Ŵ)x̂‖² and ‖Wx̂‖² over the quantized model's inputs x̂."""
    def hook_for(name):
        def hook(module, args, output):
            with torch.no_grad():
                x = args[0].detach()
                error = torch.nn.functional.linear(x, cache.original(name) - module.weight.detach()).float()
                clean = output.detach().float() + error  # W x̂ + b
                if module.bias is not None:
                    clean = clean - module.bias.detach().float()
                errors[name][0] += error.pow(2).sum(dtype=torch.float64).cpu()
                errors[name][1] += clean.pow(2).sum(dtype=torch.float64).cpu()
        return hook

    handles = [cache.modules[n].register_forward_hook(hook_for(n)) for n in errors]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
