"""Function-preserving input-channel scales that make 4-bit rounding cheaper (the AWQ move, in powers of two).

A Linear that reads an RMSNorm's output computes ``W·(γ ⊙ n)``. Multiplying its input column ``c`` by ``s_c`` and
dividing the norm's weight ``γ_c`` by ``s_c`` leaves the function unchanged, but not the 4-bit rounding: a
bitsandbytes block (64 consecutive inputs of a row) is scaled by its absmax, so columns that meet large activations
get finer steps when they are made larger. The same holds for ``down_proj``'s input columns against ``up_proj``'s
rows (the MLP multiplies ``act(gate)·up`` channel by channel). Per channel ``s_c = rms_c^½`` (the activation's root
mean square over the first calibration batch), normalised around 1 and rounded to a power of two, so that both
products are exact in bf16, fp16 and fp32 and the 16-bit model's outputs stay the same to the last bit: the
measurement compares the hidden states the output head reads (the first sequence of that batch where it is text
only) before and after, and undoes every scale if they differ (an architecture whose norm is not a plain ``γ ⊙ n``,
e.g. Gemma's ``(1 + γ) ⊙ n``). An input keeps its scales only where bitsandbytes' own round trips say they lower
its Linears' error (:func:`_helpful`).

SmolLM2-135M, 48 held-out windows (benchmarks/README.md): all-NF4 mean KLD 0.329 → 0.211 at the same bytes.
The exported checkpoint holds the scaled weights: adapters trained on it apply to it, not to the source weights.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from .micro_batches import splittable

#: the exponent of the activation RMS a channel's scale follows (AWQ's α); measured on SmolLM2 against a per-group
#: search over 0-0.75 by Gram error: within 0.006 nats of it on held-out text, with no round trip to pay
ALPHA = 0.5
#: rows of each Linear whose round trips decide whether an input's scales help (SmolLM2: the same choices as 256)
GUARD_ROWS = 32
#: exponents are clamped to ±MAX_EXPONENT (powers of two) so fp16 norms cannot overflow
MAX_EXPONENT = 8
#: largest relative difference of the checked hidden states still taken as "the same function" (bit-identical on a
#: CPU; a GPU kernel may reorder sums)
TOLERANCE = 1e-3


class ScaleSource(Enum):
    """Where a group's inverse scale goes: a norm's weight (and bias), or the rows of the Linear before it."""

    NORM = "norm"
    ROWS = "rows"


@dataclass(frozen=True)
class ChannelScales:
    """One shared input: the module that absorbs ``2^-e`` per channel and the Linears whose columns take ``2^e``."""

    source: str  # the norm (NORM) or the Linear whose output rows feed the inputs (ROWS)
    kind: ScaleSource
    linears: tuple[str, ...]
    exponents: tuple[int, ...]  # per input channel, powers of two

    def to_dict(self) -> dict:
        packed = base64.b64encode(bytes(e + 128 for e in self.exponents)).decode()
        return {"source": self.source, "kind": self.kind.value, "linears": list(self.linears), "exponents": packed}

    @staticmethod
    def from_dict(data: dict) -> ChannelScales:
        exponents = tuple(b - 128 for b in base64.b64decode(data["exponents"]))
        return ChannelScales(data["source"], ScaleSource(data["kind"]), tuple(data["linears"]), exponents)


@dataclass(frozen=True)
class Equalization:
    """Every shared input's scales; empty where the model has no such input or the check undid them."""

    groups: tuple[ChannelScales, ...] = ()
    note: str = ""  # why there are none, where there are none

    def __bool__(self) -> bool:
        return bool(self.groups)

    @property
    def scaled_modules(self) -> list[str]:
        """Every module whose weights differ from the source's."""
        return [n for g in self.groups for n in (g.source, *g.linears)]

    def fingerprint(self) -> str:
        """A short hash of the scales (tables and plans made with other scales do not match)."""
        return hashlib.sha256(repr([g.to_dict() for g in self.groups]).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"groups": [g.to_dict() for g in self.groups], "note": self.note, "fingerprint": self.fingerprint()}

    @staticmethod
    def from_dict(data: dict | None) -> Equalization:
        if not data:
            return Equalization()
        return Equalization(tuple(ChannelScales.from_dict(g) for g in data.get("groups", ())), data.get("note", ""))


def shared_inputs(model: nn.Module, candidates: set[str]) -> list[tuple[str, ScaleSource, tuple[str, ...]]]:
    """(source, kind, Linears) of each input that only a plain norm or an MLP's up rows produce, in decoder layers
    laid out as Llama's (``input_layernorm`` → ``self_attn.{q,k,v}_proj``, ``post_attention_layernorm`` →
    ``mlp.{gate,up}_proj``, ``mlp.up_proj`` → ``mlp.down_proj``), where every Linear is a candidate."""
    modules = dict(model.named_modules())
    found = []
    for name in modules:
        prefix = f"{name}." if name else ""
        layouts = ((f"{prefix}input_layernorm", ScaleSource.NORM, ("self_attn.q_proj", "self_attn.k_proj",
                                                                     "self_attn.v_proj")),
                   (f"{prefix}post_attention_layernorm", ScaleSource.NORM, ("mlp.gate_proj", "mlp.up_proj")),
                   (f"{prefix}mlp.up_proj", ScaleSource.ROWS, ("mlp.down_proj",)))
        for source, kind, suffixes in layouts:
            linears = tuple(prefix + s for s in suffixes)
            if source in modules and all(n in candidates for n in linears) and _absorbs(modules[source], kind,
                                                                                       modules[linears[0]]):
                found.append((source, kind, linears))
    return found


def _absorbs(module: nn.Module, kind: ScaleSource, first: nn.Linear) -> bool:
    """Whether ``module`` can take the inverse scales of ``first``'s inputs."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return False
    if kind is ScaleSource.NORM:
        return weight.dim() == 1 and weight.numel() == first.in_features
    return type(module) is nn.Linear and module.out_features == first.in_features


@torch.no_grad()
def measure_equalization(model: nn.Module, batch: dict, candidates: set[str], forward, formats,
                         check_forward=None) -> Equalization:
    """Scales for ``model``'s shared inputs from one calibration ``batch`` (``forward(model, batch)`` runs it), kept
    where they lower the 4-bit error in ``formats`` (bitsandbytes :class:`~analysis.formats.FourBit` values), applied
    to ``model`` in place when they keep its outputs (checked on the batch's first sequence where it is text only: the
    head's inputs there, run by ``check_forward``, default ``forward``: give one whose head reads every position; an
    image batch is checked whole, by ``forward``); the
    scales applied (empty, with a note, where none are). Not for fp16 weights: a power of two can make one of them
    subnormal, and the function would move."""
    inputs = shared_inputs(model, candidates)
    if any(p.dtype == torch.float16 for p in model.parameters()):
        return Equalization(note="fp16 weights: a power-of-two scale can round one to a subnormal (bf16 and fp32 "
                                 "have the range); analyze in bf16 or fp32 to equalize")
    if not inputs:
        return Equalization(note="no norm-fed or up_proj-fed Linear inputs (Llama-style decoder layers)")
    modules = dict(model.named_modules())
    squares = {}

    def collect(source):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            total, count = squares.get(source, (0.0, 0))
            squares[source] = (total + (x * x).sum(0), count + x.shape[0])
        return hook

    handles = [modules[linears[0]].register_forward_pre_hook(collect(source)) for source, _, linears in inputs]
    try:
        forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    measured = [(ChannelScales(source, kind, linears, _exponents(*squares[source])),
                 squares[source][0] / max(squares[source][1], 1)) for source, kind, linears in inputs if source in squares]
    groups = tuple(_helpful(modules, [(g, m) for g, m in measured if any(g.exponents)], formats))
    if not groups:
        return Equalization(note="no shared input's scales lower the expected 4-bit error (its channels are alike)")
    equalization = Equalization(groups)
    text = splittable(batch)
    check = {k: v[:1] for k, v in batch.items()} if text else batch  # a text batch: its first sequence
    check_forward = (check_forward or forward) if text else forward  # a whole image batch: not every position's logits
    before = _head_input(model, check, check_forward)
    apply_equalization(model, equalization)
    after = _head_input(model, check, check_forward)
    if before is None or after is None:
        apply_equalization(model, equalization, inverse=True)
        return Equalization(note="the output head's inputs could not be read to check the scales: measured without")
    if not _same(before, after):
        apply_equalization(model, equalization, inverse=True)
        return Equalization(note="the scaled model's outputs differed from the 16-bit ones (a norm other than γ ⊙ n?)"
                                 ": measured without scales")
    return equalization


def _helpful(modules: dict, measured: list[tuple[ChannelScales, torch.Tensor]], formats) -> list[ChannelScales]:
    """The groups whose scales lower their Linears' 4-bit output error, summed over ``formats`` (bitsandbytes' own
    round trips, weighted by each input's mean square: Σ_j E[x_j²]·δw_j²) on :data:`GUARD_ROWS` evenly spaced rows of
    each Linear. The scales follow the activations alone; where the weights' own outliers sit elsewhere (a random
    model) they can make the rounding worse, and that input keeps its weights. All rows of one input width go through
    one round trip per format and side (a block never spans two rows where the width is a multiple of the
    blocksize; another width keeps its weights)."""
    by_width: dict[int, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for index, (group, mean_square) in enumerate(measured):
        scale = torch.exp2(torch.tensor(group.exponents, dtype=torch.float32, device=mean_square.device))
        for name in group.linears:
            weight = modules[name].weight.detach()
            rows = torch.linspace(0, weight.shape[0] - 1, min(GUARD_ROWS, weight.shape[0]), device=weight.device)
            by_width.setdefault(weight.shape[1], []).append((index, weight[rows.long()], scale, mean_square))
    before, after = torch.zeros(len(measured), dtype=torch.float64), torch.zeros(len(measured), dtype=torch.float64)
    for width, parts in by_width.items():
        if any(width % f.blocksize for f in formats):
            after[[index for index, *_ in parts]] = math.inf
            continue
        weight = torch.cat([w for _, w, _, _ in parts])
        scale = torch.cat([s.to(w.device).expand(len(w), width) for _, w, s, _ in parts])
        mean_square = torch.cat([m.to(w.device).expand(len(w), width) for _, w, _, m in parts])
        owner = torch.cat([torch.full((len(w),), index) for index, w, _, _ in parts])
        for fmt in formats:
            plain = (fmt.roundtrip(weight)[0].float() - weight.float()) ** 2
            scaled = (fmt.roundtrip((weight.float() * scale).to(weight.dtype))[0].float() / scale - weight.float()) ** 2
            before.index_add_(0, owner, (plain * mean_square).sum(1).double().cpu())
            after.index_add_(0, owner, (scaled * mean_square).sum(1).double().cpu())
    return [group for index, (group, _) in enumerate(measured) if after[index] < before[index]]


def _exponents(total: torch.Tensor, count: int) -> tuple[int, ...]:
    """Powers of two around 1 that follow rms^ALPHA (dead channels get the smallest)."""
    rms = (total / max(count, 1)).sqrt().clamp(min=1e-6)
    log_scale = ALPHA * torch.log2(rms)
    log_scale = log_scale - (log_scale.max() + log_scale.min()) / 2
    return tuple(int(e) for e in torch.round(log_scale).clamp(-MAX_EXPONENT, MAX_EXPONENT).tolist())


def _head_input(model: nn.Module, batch: dict, forward) -> torch.Tensor | None:
    """The output head's input (the last hidden states the head reads) on ``batch``; None where the head module is
    not called (nothing to check on)."""
    head = model.get_output_embeddings()
    seen = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().float().cpu()))
    try:
        forward(model, batch)
    finally:
        handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]) if seen else None


def _same(before: torch.Tensor, after: torch.Tensor) -> bool:
    if before.shape != after.shape or not torch.isfinite(after).all():
        return False
    scale = before.abs().max().clamp(min=1e-12)
    return bool((after - before).abs().max() <= TOLERANCE * scale)


@torch.no_grad()
def apply_equalization(model: nn.Module, equalization: Equalization, inverse: bool = False) -> None:
    """Scale ``model``'s weights in place as ``equalization`` says (``inverse``: undo it)."""
    modules = dict(model.named_modules())
    for group in equalization.groups:
        sign = -1.0 if inverse else 1.0
        for name in group.linears:
            weight = modules[name].weight
            weight.mul_(_factors(group, sign, weight))
        source = modules[group.source]
        if group.kind is ScaleSource.NORM:
            source.weight.mul_(_factors(group, -sign, source.weight))
            if getattr(source, "bias", None) is not None:
                source.bias.mul_(_factors(group, -sign, source.bias))
        else:
            source.weight.mul_(_factors(group, -sign, source.weight)[:, None])
            if source.bias is not None:
                source.bias.mul_(_factors(group, -sign, source.bias))


def scale_tensor(equalization: Equalization, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the checkpoint's ``name``, a weight or bias) as the equalized model holds it (the export reads
    the source's tensors one by one)."""
    module, _, kind = name.rpartition(".")
    for group in equalization.groups:
        if module in group.linears and kind == "weight":
            tensor = tensor * _factors(group, 1.0, tensor)
        if module == group.source:
            factors = _factors(group, -1.0, tensor)
            tensor = tensor * (factors[:, None] if group.kind is ScaleSource.ROWS and kind == "weight" else factors)
    return tensor


def _factors(group: ChannelScales, sign: float, like: torch.Tensor) -> torch.Tensor:
    exponents = torch.tensor(group.exponents, dtype=torch.float32, device=like.device)
    return torch.exp2(sign * exponents).to(like.dtype)


def mean_abs_exponent(equalization: Equalization) -> float:
    """The mean |exponent| over every scaled channel (0: nothing moved), for the summary line."""
    exponents = [abs(e) for g in equalization.groups for e in g.exponents]
    return sum(exponents) / len(exponents) if exponents else math.nan


def equalization_of(meta: dict) -> Equalization:
    """The scales a table's (or plan's) metadata records: empty for one made without them."""
    return Equalization.from_dict(meta.get("equalization"))
