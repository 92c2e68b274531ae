"""Backward hooks that stream the squared next-token-loss gradient at each Linear's output.

With g = ∂L/∂y at a module's output, the Fisher-weighted output error of a rounded weight is
Σ_t Σ_o g_{t,o}² Δy_{t,o}², a second-order estimate of how much the next-token loss grows
(the HAWQ / ModelOpt family). Assuming the gradient's size and the error are independent
across tokens it factorises into Σ_o f_o · d_o with f_o = mean_t g_{t,o}² (kept here, one
number per output channel) and d_o = (ΔW·G·ΔWᵀ)_oo from the input Gram matrix. Unlike the
relative output error it is in loss units, so module scores add up.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from quantplan.common.batches import batch_to

from .finite_rows import finite_squared_sum
from .hooks import module_hooks


@dataclass
class GradientProbe:
    """Accumulates Σ_t g_{t,o}² per output channel of the named Linears over finished batches."""

    model: nn.Module
    names: list[str]
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    ran: set[str] = field(default_factory=set)  # modules that ran in a backward batch, reached by a gradient or not

    def __post_init__(self):
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}
        self._running: set[str] = set()

    @contextmanager
    def attached(self):
        """Hook the named modules' outputs for the duration of the block.

        A forward hook registers a gradient hook on each output tensor: cheaper than
        ``register_full_backward_hook``, which wraps every input and output in an extra autograd node.
        """
        with module_hooks(self.model, {n: self._hook(n) for n in self.names}):
            yield self

    def _hook(self, name: str):
        def on_gradient(g):
            squared, count = finite_squared_sum(g.detach().reshape(-1, g.shape[-1]).float())
            previous = self._pending.get(name)
            self._pending[name] = (squared + previous[0], count + previous[1]) if previous else (squared, count)

        def hook(module, args, output):
            if torch.is_tensor(output) and output.requires_grad:
                self._running.add(name)
                output.register_hook(on_gradient)

        return hook

    def start_batch(self) -> None:
        self._pending.clear()
        self._running.clear()

    def commit_batch(self) -> None:
        """The backward pass finished: fold the batch into the totals."""
        for name, (squared, count) in self._pending.items():
            # a resumed sum was read onto the CPU (:meth:`load_state`): it joins the gradients' device here
            self.sums[name] = self.sums[name].to(squared.device) + squared if name in self.sums else squared
            self.tokens[name] = self.tokens.get(name, 0) + count
        self.ran |= self._running
        self._pending.clear()
        self._running.clear()

    def mean_squared_gradient(self, name: str) -> torch.Tensor | None:
        """f_o = mean over tokens of g_{t,o}² (None if the module never got a gradient)."""
        if name not in self.sums or not self.tokens.get(name):
            return None
        return self.sums[name] / self.tokens[name]


    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save with the partial results (sums, and token counts as 1-element tensors)."""
        out = {f"{n}::gradsq": s.cpu().contiguous() for n, s in self.sums.items()}
        out.update({f"{n}::gradtokens": torch.tensor([t]) for n, t in self.tokens.items()})
        out.update({f"{n}::gradran": torch.tensor([1]) for n in self.ran})
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state`."""
        for key, value in tensors.items():
            name, _, kind = key.rpartition("::")
            if kind == "gradsq":
                self.sums[name] = value
            elif kind == "gradtokens":
                self.tokens[name] = int(value[0])
            elif kind == "gradran":
                self.ran.add(name)


def loss_backward(model, batch: dict, device, labels: str = "sampled", seed: int = 0) -> None:
    """Next-token loss backpropagated to every activation (weights stay frozen).

    ``labels="sampled"`` draws each position's target from the model's own next-token
    distribution (seeded), which makes E[g²] the true Fisher of the model's output distribution:
    the curvature of the KL divergence a quantized model is judged by. ``labels="data"`` uses
    the text's actual next tokens (the empirical Fisher). The whole batch's logits exist at once:
    :func:`analysis.stream_head.chunked_loss_backward` is the same sampled loss in token chunks.
    """
    with activations_need_grad(model, batch, device) as inputs:
        logits = model(**inputs, use_cache=False).logits.float()
        _next_token_loss(logits, inputs["input_ids"], labels, seed).backward()


@contextmanager
def activations_need_grad(model, batch: dict, device):
    """The batch on ``device`` with gradients on: from the embeddings' output (and the pixel values, so gradients
    reach the vision tower and projector) through every activation, the weights frozen meanwhile."""
    inputs = batch_to(batch, device)
    for value in inputs.values():
        if torch.is_tensor(value) and value.is_floating_point():
            value.requires_grad_()

    def needs_grad(module, args, output):
        return output.requires_grad_()

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(needs_grad)
    try:
        with torch.enable_grad():
            yield inputs
    finally:
        handle.remove()
        for p in frozen:
            p.requires_grad_(True)


def _next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, labels: str, seed: int) -> torch.Tensor:
    vocab = logits.shape[-1]
    if labels == "data":
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), input_ids[:, 1:].reshape(-1))
    if labels != "sampled":
        raise ValueError(f"unknown Fisher labels {labels!r}: use 'sampled' or 'data'")
    flat = logits.reshape(-1, vocab)
    with torch.no_grad():
        target = sample_targets(flat, sampling_uniforms(flat.shape[0], flat.device, seed))
    return torch.nn.functional.cross_entropy(flat, target)


def sampling_uniforms(tokens: int, device, seed: int) -> torch.Tensor:
    """One seeded uniform draw per token position, for :func:`sample_targets`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(tokens, generator=generator, device=device)


def sample_targets(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Each row's target drawn from softmax(row) by inverting its CDF at the row's uniform draw.

    The draws are fixed before the logits exist, so targets are the same whether the rows come
    in one piece (in memory) or in token chunks (:mod:`analysis.stream_head`): each row is drawn on its own
    (``torch.multinomial`` on CUDA draws differently when called chunk by chunk). On CUDA a row's sums may
    round differently with the number of rows reduced at once, which can move a draw that lies within rounding
    of a boundary to the neighbouring token.
    """
    return _draw(logits.float().softmax(dim=-1), uniforms)


def sampled_loss_gradient(logits: torch.Tensor, uniforms: torch.Tensor, tokens: int) -> torch.Tensor:
    """∂L/∂logits for rows of logits, L = Σ_rows cross entropy(row, its :func:`sample_targets` target) / ``tokens``.

    That gradient is (softmax(row) − onehot(target)) / tokens: the softmax the targets are drawn from gives it
    directly, with no log-softmax and no autograd pass through the loss (the streamed head's chunks run this).
    """
    probs = logits.float().softmax(dim=-1)
    target = _draw(probs, uniforms)
    probs[torch.arange(len(target), device=probs.device), target] -= 1
    return probs.div_(tokens).to(logits.dtype)


#: vocabulary entries per block of the two-level draw (:func:`_draw`)
DRAW_BLOCK = 256


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Each row's index where its cumulative probability passes the row's uniform draw (scaled to the row's total).

    In two levels, which give the index a cumulative sum over the whole row gives, but for rounding at a boundary:
    the blocks of :data:`DRAW_BLOCK` entries are summed and the draw's block found on their cumulative sums, then
    the entry within that block. A row-long ``cumsum`` is a sequential scan, about 20 times slower than the block
    sums on the CPU (0.2 of the 1.1 s the head of SmolLM2's Fisher pass took per 2048 tokens, benchmarks/README.md).
    """
    rows, vocab = probs.shape
    full = vocab - vocab % DRAW_BLOCK
    sums = [probs[:, :full].reshape(rows, full // DRAW_BLOCK, DRAW_BLOCK).sum(-1)] if full else []
    if full < vocab:
        sums.append(probs[:, full:].sum(-1, keepdim=True))
    block_cdf = torch.cat(sums, dim=-1).cumsum(dim=-1)
    points = (uniforms.to(block_cdf) * block_cdf[:, -1]).unsqueeze(-1)
    block = torch.searchsorted(block_cdf, points).clamp_(max=block_cdf.shape[-1] - 1)
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp_(min=0)), torch.zeros_like(points))
    columns = block * DRAW_BLOCK + torch.arange(DRAW_BLOCK, device=probs.device)
    past_end = columns >= vocab  # the last block's columns beyond the row (a partial block): probability 0
    inside = probs.gather(-1, columns.clamp(max=vocab - 1)).masked_fill_(past_end, 0)
    inside_cdf = inside.cumsum(dim=-1)
    # the block's sum and its cumulative sum round differently: a point past the latter falls on its last nonzero entry
    within = torch.searchsorted(inside_cdf, torch.minimum(points - before, inside_cdf[:, -1:]))
    return (block.squeeze(-1) * DRAW_BLOCK + within.squeeze(-1)).clamp_(max=vocab - 1)


def fisher_weights(grads: GradientProbe | None, name: str, out_features: int, stats, device=None):
    """f_o of module ``name`` (:meth:`GradientProbe.mean_squared_gradient`; None without a Fisher pass or where the
    module never ran in a batch the pass backpropagated: unknown, not 0); zeros where it ran in one and no gradient
    reached it: its output feeds nothing the loss reads (LLaVA's last vision layer under ``vision_feature_layer`` -2),
    so its error costs nothing, where a NaN made the objective rank it by weight error and spend bytes on it."""
    if grads is None:
        return None
    if name not in grads.sums and name in grads.ran and stats is not None and stats.tokens > 0:
        return torch.zeros(out_features, dtype=torch.float32, device=device)  # the gradient hook never fired
    return grads.mean_squared_gradient(name)  # None also where every gradient row was non-finite: unknown, not 0
