"""End-to-end probes: how far the quantized model's next-token distribution drifts from 16-bit, and which
module's rounding drives that drift in the context of all the others.

The 16-bit model's logits on the calibration batches come from a
:class:`~analysis.reference.KLReference`, one batch at a time;
:func:`~analysis.reference.calibration_klds` measures the mean next-token KL divergence of
variants of the model (some weights swapped for bitsandbytes' round trip by
:class:`~analysis.simulate.QuantCache`). Against it:

- :func:`restore_gains` reads, per batch, the 16-bit reference (where the logits are plain ``lm_head(hidden)``: the
  16-bit last hidden states, kept by the analysis or an earlier comparison, else computed once and kept, and
  lm_head in token chunks, so no batch × vocabulary tensor exists; else the batch's 16-bit logits), runs one
  forward and backward pass of the KL with the named modules quantized, and gives every quantized module i the first-order decrease of the KL if
  it alone went back to 16-bit: ``gain_i = −⟨∂KL/∂W_i, W_i − Ŵ_i⟩``. Measured with every module
  quantized this is the *quantized-context* score: the module's input carries all upstream
  rounding and its gradient all downstream rounding, so propagation and interaction are in it
  (the local output error and the Fisher score see one module in an otherwise 16-bit model).
  Re-measured after restoring some modules, it is what the planner's refinement iterates on.
  In the same pass, forward hooks record each quantized module's own output error on the
  inputs of the quantized model, ``‖(W−Ŵ)x̂‖² / ‖Wx̂‖²``.
- Each quantized module computes in its own current format (``formats``: a plan over a blocksize
  menu puts some modules in blocksize 32, some in 64), and the same gradient gives the
  first-order KL decrease of moving it to any other 4-bit format f of a ``menu``:
  ``−⟨∂KL/∂W_i, Ŵ_f − Ŵ_cur⟩`` (:class:`Move`, with the geometry ``‖Ŵ_f − W‖²`` and
  ``⟨Ŵ_f − W, Ŵ_cur − W⟩`` the planner's refinement scores need, :mod:`planner.refine_scores`).
  Ŵ_f is bitsandbytes' own round trip (the cache's), de-quantized inside the gradient hook one
  module at a time and freed.

A model larger than memory gets the same numbers block by block from disk
(:func:`analysis.stream_gains.streamed_restore_gains`): :class:`GainSums` holds the sums and makes
the hooks against whichever :class:`~analysis.simulate.QuantCache` holds a module (the whole model's
here, the loaded block's there), so one implementation folds the gradients of both passes. The
planner's refinement takes either as a :data:`GainsMeasure`.

Along the straight path from 16-bit to all-quantized the KL grows about quadratically, so the
gains of all modules add up to about twice the KL (a module's gain counts its interactions with
every other module); they rank modules, the KL itself is measured by
:func:`~analysis.reference.calibration_kld`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from quantplan.common.batches import model_device

from .head_chunks import base_hidden, chunk_size, head_kl_gradient
from .micro_batches import activation_budget, micro_batches, sequences_per_micro_batch, splittable
from .reference import KLReference, forward_logits, kl_sum
from .stream_head import plain_head


@dataclass
class RestoreGains:
    """Result of :func:`restore_gains` (gains in nats per token, first order)."""

    kld: float  # mean KL of the model with the quantized modules, measured in the same pass
    gains: dict[str, float] = field(default_factory=dict)  # module -> first-order KL decrease if restored (NaN:
    # no gradient reached it)
    context_error: dict[str, float] = field(default_factory=dict)  # module -> ‖(W−Ŵ)x̂‖² / ‖Wx̂‖²
    moves: dict[str, dict[str, Move]] = field(default_factory=dict)  # module -> menu label -> Move (only the
    # modules a gradient reached)
    tokens: int = 0  # the calibration positions the KL was summed over


@dataclass(frozen=True)
class Move:
    """Moving one quantized module from its current format Ŵ_cur to a menu format Ŵ_f (W: its 16-bit weight)."""

    gain: float  # −⟨∂KL/∂W, Ŵ_f − Ŵ_cur⟩: first-order KL decrease, nats per token (0 for the current format)
    error_sq: float  # ‖Ŵ_f − W‖²
    overlap: float  # ⟨Ŵ_f − W, Ŵ_cur − W⟩ (= ‖Ŵ_cur − W‖² for the current format)


#: (module names, their formats, menu) -> the gains of one gradient pass: what the planner's refinement measures,
#: in a loaded model (:func:`restore_gains`) or block by block from disk (:class:`analysis.stream_gains.StreamedGains`)
GainsMeasure = Callable[[list[str], Mapping, Mapping], RestoreGains]


class GainSums:
    """The running sums of one gradient pass, whichever way it runs (the whole model at once, or block by block).

    Each quantized module's hooks are made against a :class:`~analysis.simulate.QuantCache` that holds it (the
    whole model's, or the one of the block it sits in): ``cache.original(name)``, ``cache.restored(name, fmt)``
    and ``cache.modules``. The weight-gradient hook (:meth:`folds`) folds ⟨∂KL/∂W, W−Ŵ⟩ and the menu moves as
    each gradient arrives; :meth:`context_hooks` sums the output error; :meth:`finish` adds a module's
    :class:`Move` geometry while its cache still holds it; :meth:`result` is the pass's :class:`RestoreGains`.
    """

    def __init__(self, quantized, formats: Mapping | None = None, menu: Mapping | None = None,
                 context_error: bool = False):
        self.quantized = list(quantized)
        self.formats, self.menu = dict(formats or {}), dict(menu or {})
        self.gains = {n: torch.zeros((), dtype=torch.float64) for n in self.quantized}
        self.moved = {n: {label: torch.zeros((), dtype=torch.float64) for label in self.menu} for n in self.quantized}
        self.reached: set[str] = set()
        self.errors = {n: torch.zeros(2, dtype=torch.float64) for n in self.quantized} if context_error else {}
        self.moves: dict[str, dict[str, Move]] = {}
        self.total = 0.0  # Σ KL over the positions (nats)
        self._deferred: set[str] = set()  # names whose gradient accumulates for now (:meth:`one_fold`)

    def folds(self, cache, names) -> dict:
        """name -> the gradient hook of each of ``names`` (:func:`weights_require_grad` registers them)."""
        return {n: self._fold(cache, n, self._deferred) for n in names}

    def _fold(self, cache, name: str, deferred=frozenset()):
        """The gradient hook of ``name`` against ``cache`` (:func:`_fold_gradient`)."""
        return _fold_gradient(cache, name, self.gains, self.reached,
                              _targets(cache, name, self.formats, self.menu, self.moved[name]), deferred)

    @contextmanager
    def one_fold(self, cache, name: str | None):
        """Inside the block the weight gradient of ``name`` accumulates, and is folded once at its end, instead of as
        each backward brings a part: the head's gradient comes once per chunk of tokens, and each fold reads the whole
        vocabulary × hidden weight and de-quantizes every menu entry of it. (Nothing to do if ``name`` is not
        quantized in this pass.) The gradient adds up in the weight's dtype: on a bf16 262k-vocabulary tiny Llama the
        head's gain moved by 2e-4 relative, and the pass took 24 instead of 93 CPU s."""
        if name not in self.quantized or name not in cache.modules:
            yield
            return
        self._deferred.add(name)
        try:
            yield
        finally:
            self._deferred.discard(name)
        weight = cache.modules[name].weight
        if weight.grad is not None:  # made here, not kept: a hook holds its cache (a streamed pass has one per stage)
            self._fold(cache, name)(weight)

    def context_hooks(self, cache, names):
        """The output-error forward hooks of ``names`` (none without ``context_error``)."""
        return _context_error_hooks(cache, {n: self.errors[n] for n in names if n in self.errors})

    def finish(self, cache, names) -> None:
        """The :class:`Move` of each of ``names`` a gradient reached (with the 16-bit weights in the cache)."""
        for n in names:
            if n in self.reached and self.menu:
                self.moves[n] = _moves(cache, n, self.formats.get(n), self.menu, self.moved[n])

    def result(self, tokens: int) -> RestoreGains:
        """The pass's gains over ``tokens`` positions (the KL's denominator)."""
        return RestoreGains(
            kld=self.total / max(tokens, 1),
            gains={n: float(g) if n in self.reached else float("nan") for n, g in self.gains.items()},
            context_error={n: float(e[0] / e[1]) if e[1] > 0 else float("nan") for n, e in self.errors.items()},
            moves={n: self.moves[n] for n in self.quantized if n in self.moves},
            tokens=tokens,
        )


def restore_gains(model, reference: KLReference, cache, quantized, *, formats: Mapping | None = None,
                  menu: Mapping | None = None, context_error: bool = False, progress: bool = False) -> RestoreGains:
    """First-order KL decrease from restoring each module of ``quantized`` (see module docstring).

    ``cache`` is an :class:`~analysis.simulate.QuantCache` of ``model``; the modules in
    ``quantized`` compute with their round-tripped weights during the pass (each in
    ``formats[name]`` where given, else the cache's format), every other module with its 16-bit
    weight. ``menu`` (label -> 4-bit format) asks for each quantized module's :class:`Move` to
    every entry as well. Weights are not trained: their gradients are consumed by a hook per
    module as soon as they are accumulated, so at most one weight gradient is alive beside a quantized lm_head's,
    which adds up over each batch's token chunks and is folded once a batch (:meth:`GainSums.one_fold`).
    """
    sums = GainSums(quantized, formats, menu, context_error)
    quantized = sums.quantized
    chunked = plain_head(model)
    with weights_require_grad(model, cache, sums.folds(cache, quantized)):
        for index, batch in enumerate(tqdm(reference.batches(), total=reference.count, desc="quantized-context gradients",
                                           disable=not progress, leave=False)):
            if chunked:
                sums.total += _chunked_batch(model, reference, cache, sums, quantized, index, batch)
                continue
            logits16 = reference.logits16(batch)  # 16-bit weights here; this batch's logits only
            with cache.quantized(quantized, sums.formats), sums.context_hooks(cache, quantized), torch.enable_grad():
                kl = kl_sum(logits16, forward_logits(model, batch), batch)
                (kl / reference.tokens).backward()
            sums.total += float(kl.detach())
            del logits16, kl
    sums.finish(cache, quantized)
    return sums.result(reference.tokens)


def _chunked_batch(model, reference: KLReference, cache, sums: GainSums, quantized, index: int, batch: dict) -> float:
    """One batch of :func:`restore_gains` for a :func:`~analysis.stream_head.plain_head` model, its KL sum: the quantized
    body's last hidden states with their graph, the KL's gradient at them from lm_head in token chunks against the
    16-bit states (:meth:`~analysis.reference.KLReference.hidden16`: kept, else computed now, with the 16-bit
    weights), then one backward through the body; a text batch a few sequences at a time, so their saved activations
    fit :func:`~analysis.micro_batches.activation_budget` as in the Fisher pass (the KL is a sum over tokens: the
    same gradients; the gradient hooks fold once per part, a quantized lm_head's once per batch). No batch ×
    vocabulary logits exist."""
    hidden16 = reference.hidden16(index, batch)
    head, seq_len = model.lm_head, hidden16.shape[1]
    total = 0.0
    with cache.quantized(quantized, sums.formats), sums.context_hooks(cache, quantized), torch.enable_grad(), \
            sums.one_fold(cache, "lm_head"):
        weight16 = cache.original("lm_head") if "lm_head" in cache.modules else head.weight.detach()
        budget = activation_budget(model_device(model))  # read here: the plan's de-quantized weights now exist
        sequences = (sequences_per_micro_batch(model.config.get_text_config(), seq_len, budget)
                     if splittable(batch) else len(hidden16))
        for offset, part in micro_batches(batch, sequences):
            hidden = base_hidden(model, part)
            first = offset // seq_len
            grad, kl = head_kl_gradient(head, weight16, hidden16[first:first + len(hidden)], hidden, part, index,
                                        reference.tokens, chunk_size(model))
            if hidden.requires_grad:  # else no weight before the head is quantized: nothing to backpropagate into
                hidden.backward(grad)
            total += kl
            del hidden, grad
    return total


def _targets(cache, name, formats, menu, sums) -> list:
    """(format, accumulator) of the menu entries ``name`` could move to (its current format moves nowhere)."""
    current = formats.get(name) or cache.format
    return [(fmt, sums[label]) for label, fmt in menu.items() if fmt != current]


def _moves(cache, name, current, menu, sums) -> dict[str, Move]:
    """The :class:`Move` of ``name`` to each menu entry: the summed gains plus the round trips' geometry,
    one de-quantized format at a time."""
    with torch.no_grad():
        weight = cache.original(name).float()
        error = cache.restored(name, current).float() - weight  # Ŵ_cur − W
        result = {}
        for label, fmt in menu.items():
            other = cache.restored(name, fmt).float() - weight  # Ŵ_f − W
            result[label] = Move(float(sums[label]), float(other.pow(2).sum(dtype=torch.float64)),
                                 float((other * error).sum(dtype=torch.float64)))
            del other
    return result


@contextmanager
def weights_require_grad(model, cache, folds):
    """Only the weights of ``folds`` (name -> gradient hook) get gradients; each is folded into its gains and
    freed on arrival (a module no gradient reached keeps no gain: NaN, not a misleading zero)."""
    names = list(folds)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    handles = []
    for name in names:
        weight = cache.modules[name].weight
        weight.requires_grad_(True)
        handles.append(weight.register_post_accumulate_grad_hook(folds[name]))
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


def _fold_gradient(cache, name, gains, reached, targets, deferred=frozenset()):
    """The weight-gradient hook of ``name``: fold ⟨∂KL/∂W, W − Ŵ⟩ into its gain and each menu move's, then free the
    gradient; while ``name`` is in ``deferred`` the gradient accumulates instead (:meth:`GainSums.one_fold`)."""
    def hook(weight):
        reached.add(name)
        if name in deferred:
            return
        with torch.no_grad():
            grad, current = weight.grad.reshape(-1), weight.detach().reshape(-1)
            gains[name] -= _step_dot(grad, cache.original(name).reshape(-1), current)  # W − Ŵ: back to 16-bit
            for fmt, total in targets:  # the step to another 4-bit format: Ŵ_f − Ŵ_cur, one restored weight at a time
                total -= _step_dot(grad, cache.restored(name, fmt).reshape(-1), current)
        weight.grad = None

    return hook


#: elements per block of :func:`_step_dot`: its float32 temporaries are a few of these, whatever the weight's size
FOLD_BLOCK = 1 << 22


def _step_dot(grad: torch.Tensor, target: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """⟨grad, target − current⟩ (flat tensors of the weight's dtype) as a float64 scalar, :data:`FOLD_BLOCK` elements
    at a time in float32: no weight-sized float32 copy (a 262k-vocabulary lm_head's is gigabytes)."""
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, grad.numel(), FOLD_BLOCK):
        part = slice(start, start + FOLD_BLOCK)
        total += _dot(grad[part].float(), target[part].float() - current[part].float())
    return total


#: elements per float32 dot product in :func:`_dot`, whose results add up in float64
DOT_CHUNK = 1 << 16


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ of two flat float32 tensors as a float64 scalar on the CPU: float32 dot products (BLAS, no product
    tensor) of :data:`DOT_CHUNK` elements each, added up in float64 (relative error 2-5e-6 against an all-float64 sum on
    4M random terms that mostly cancel). A gradient pass in micro-batches folds every weight's gradient once per part, so
    this runs often: a third of the time of a float64 ``(a * b).sum()`` on the CPU. On a GPU that sum is one kernel
    (the loop would launch thousands), so it stays."""
    if a.device.type != "cpu":
        return (a * b).sum(dtype=torch.float64).cpu()
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, a.numel(), DOT_CHUNK):
        total += torch.dot(a[start:start + DOT_CHUNK], b[start:start + DOT_CHUNK]).double()
    return total.cpu()


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
