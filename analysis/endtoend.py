"""End-to-end probes: how far the quantized model's next-token distribution drifts from 16-bit, and which
module's rounding drives that drift in the context of all the others.

:class:`KLReference` keeps the 16-bit model's logits on the calibration batches. Against it:

- :func:`calibration_kld` measures the mean next-token KL divergence of the model as it is now
  (for instance with some weights swapped for bitsandbytes' round trip by :class:`~analysis.simulate.QuantCache`);
- :func:`restore_gains` runs one forward and backward pass of that KL per batch with the named
  modules quantized, and gives every quantized module i the first-order decrease of the KL if
  it alone went back to 16-bit: ``gain_i = −⟨∂KL/∂W_i, W_i − Ŵ_i⟩``. Measured with every module
  quantized this is the *quantized-context* score: the module's input carries all upstream
  rounding and its gradient all downstream rounding, so propagation and interaction are in it
  (the local output error and the Fisher score see one module in an otherwise 16-bit model).
  Re-measured after restoring some modules, it is what the planner's refinement iterates on.
  In the same pass, forward hooks record each quantized module's own output error on the
  inputs of the quantized model, ``‖(W−Ŵ)x̂‖² / ‖Wx̂‖²``.

Along the straight path from 16-bit to all-quantized the KL grows about quadratically, so the
gains of all modules add up to about twice the KL (a module's gain counts its interactions with
every other module); they rank modules, the KL itself is measured by :func:`calibration_kld`.
Memory: the 16-bit logits are kept in the model's dtype on the CPU (2 bytes x vocabulary per
token: 800 MB for SmolLM2's 8192 default calibration tokens); ``max_batches`` bounds it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm


class KLReference:
    """The 16-bit model's next-token logits on the first ``max_batches`` calibration batches."""

    def __init__(self, model, calibration, batch_size: int = 4, max_batches: int | None = None,
                 progress: bool = False):
        total = calibration.num_batches(batch_size)
        self.count = total if max_batches is None else min(total, max_batches)
        self.calibration, self.batch_size = calibration, batch_size
        device = _device(model)
        self.logits = []
        with torch.inference_mode():
            for batch in tqdm(self.batches(), total=self.count, desc="16-bit logits", disable=not progress,
                              leave=False):
                self.logits.append(_forward(model, batch, device).logits.detach().to("cpu"))
        self.tokens = sum(int(_mask(b, logits).sum()) for b, logits in zip(self.batches(), self.logits, strict=True))

    def batches(self):
        """The calibration batches this reference covers, in order."""
        for index, batch in enumerate(self.calibration.batches(self.batch_size)):
            if index >= self.count:
                return
            yield batch


def calibration_kld(model, reference: KLReference) -> float:
    """Mean next-token KL divergence (nats per token) of ``model`` as it is now from the 16-bit logits."""
    device, total = _device(model), 0.0
    with torch.inference_mode():
        for batch, logits16 in zip(reference.batches(), reference.logits, strict=True):
            total += float(_kl_sum(logits16, _forward(model, batch, device).logits, batch))
    return total / max(reference.tokens, 1)


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
    device, total = _device(model), 0.0
    with cache.quantized(quantized), _weights_require_grad(model, cache, quantized, gains, reached), \
            _context_error_hooks(cache, errors), torch.enable_grad():
        for batch, logits16 in tqdm(zip(reference.batches(), reference.logits, strict=True), total=reference.count,
                                    desc="quantized-context gradients", disable=not progress, leave=False):
            kl = _kl_sum(logits16, _forward(model, batch, device).logits, batch)
            (kl / reference.tokens).backward()
            total += float(kl.detach())
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


def _kl_sum(logits16: torch.Tensor, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Σ over (unmasked) positions of KL(P_16 ‖ Q), in float32; padded vocabularies compare the shared part."""
    vocab = min(logits16.shape[-1], logits.shape[-1])
    logp = torch.log_softmax(logits16[..., :vocab].to(logits.device).float(), dim=-1)
    logq = torch.log_softmax(logits[..., :vocab].float(), dim=-1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return (per_token * _mask(batch, per_token).to(per_token)).sum()


def _mask(batch: dict, like: torch.Tensor) -> torch.Tensor:
    mask = batch.get("attention_mask")
    shape = like.shape[:2]
    return mask.to(like.device).reshape(shape) if mask is not None else torch.ones(shape, device=like.device)


def _forward(model, batch: dict, device):
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return model(**inputs, use_cache=False)


def _device(model) -> torch.device:
    return next(model.parameters()).device
