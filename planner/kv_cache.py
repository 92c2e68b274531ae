"""Device budgets: the KV cache and an activation allowance, subtracted from a budget to give the weights' share.

``--budget 8GB --kv-context 8192 --kv-batch 1`` means 8 GB of device memory for the weights,
the KV cache of ``batch`` sequences of ``context`` tokens, and the activations of their prefill.

- **KV cache** (16-bit, 2 bytes): per layer 2 (K and V) x KV heads x head size x cached tokens x
  batch. A full-attention layer caches the context; a sliding-window layer (``layer_types``
  ``sliding_attention``, or every layer of a Mistral-style config with ``sliding_window``) or a
  chunked one caches at most its window; an Mllama cross-attention layer caches the vision
  tokens of one image (:func:`analysis.attention.cross_attention_tokens`), not the text.
- **Activations**: the prefill of the whole context in one pass (as transformers' ``generate``
  does) holds, in the widest layer, the residual stream, its normed copy, the attention
  output and the query (4 x hidden) and the MLP's gate, up and product (3 x intermediate) per
  token in 16-bit, plus float32 logits of the last token per sequence:
  ``batch x context x (4 x hidden + 3 x intermediate) x 2 + batch x vocab x 4`` bytes.
  Attention scores are not materialised (SDPA / flash attention).

The numbers come from the table's ``meta["attention"]`` (written by the analysis), or, for a
table analyzed before it was stored, from the config.json of the model the table names.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from quantplan.common.sizes import format_bytes

from .budget import BudgetError, parse_budget
from .plan_types import DeviceBudget

KV_DTYPE_BYTES = 2  # bf16/fp16 cache


class CacheKind(Enum):
    """What a layer's KV cache holds."""

    FULL = "full"  # every token of the context
    WINDOW = "window"  # at most the sliding window (or attention chunk)
    CROSS = "cross"  # the vision tokens of one image (Mllama cross-attention)


@dataclass(frozen=True)
class CacheLayer:
    """One decoder layer's cache shape."""

    kind: CacheKind
    kv_heads: int
    head_dim: int
    tokens: int | None = None  # the window (WINDOW) or the vision tokens (CROSS)

    def cached_tokens(self, context: int) -> int:
        """Tokens this layer holds per sequence at ``context`` tokens of text."""
        if self.kind is CacheKind.FULL:
            return context
        if self.kind is CacheKind.WINDOW:
            return min(context, self.tokens)
        return self.tokens


_WINDOW_TYPES = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}


def cache_layers(attention: dict) -> list[CacheLayer]:
    """The cache shape of every decoder layer of a model with these attention values (analysis.attention)."""
    layers = int(attention["num_hidden_layers"])
    heads = int(attention["num_attention_heads"])
    kv_heads = int(attention.get("num_key_value_heads") or heads)
    head_dim = int(attention.get("head_dim") or attention["hidden_size"] // heads)
    cross = set(attention.get("cross_attention_layers") or ())
    types = attention.get("layer_types") or [_default_type(attention)] * layers
    if len(types) != layers:
        raise ValueError(f"config layer_types lists {len(types)} layers, num_hidden_layers is {layers}")
    out = []
    for index, kind in enumerate(types):
        if index in cross:
            out.append(CacheLayer(CacheKind.CROSS, kv_heads, head_dim, int(attention["cross_attention_tokens"])))
        elif kind == "full_attention":
            out.append(CacheLayer(CacheKind.FULL, kv_heads, head_dim))
        elif kind in _WINDOW_TYPES and attention.get(_WINDOW_TYPES[kind]):
            out.append(CacheLayer(CacheKind.WINDOW, kv_heads, head_dim, int(attention[_WINDOW_TYPES[kind]])))
        else:
            raise ValueError(f"layer {index} is of attention type {kind!r}, whose cache quantplan cannot size: "
                             "plan with --budget alone (weights) and leave room for the cache yourself")
    return out


def _default_type(attention: dict) -> str:
    """Configs without ``layer_types``: Mistral-style ``sliding_window`` on every layer, else full attention."""
    sliding = attention.get("sliding_window") and attention.get("use_sliding_window", True)
    return "sliding_attention" if sliding else "full_attention"


def kv_cache_bytes(attention: dict, context: int, batch: int = 1) -> int:
    """Bytes of the 16-bit KV cache of ``batch`` sequences of ``context`` tokens."""
    return sum(2 * layer.kv_heads * layer.head_dim * layer.cached_tokens(context) * batch * KV_DTYPE_BYTES
               for layer in cache_layers(attention))


def activation_bytes(attention: dict, context: int, batch: int = 1) -> int:
    """The activation allowance of a one-pass prefill (formula in the module docstring)."""
    hidden = int(attention["hidden_size"])
    intermediate = int(attention.get("intermediate_size") or 4 * hidden)
    vocab = int(attention.get("vocab_size") or 0)
    return batch * context * (4 * hidden + 3 * intermediate) * 2 + batch * vocab * 4


def device_budget(attention: dict, budget, context: int, batch: int = 1) -> DeviceBudget:
    """Split the absolute device ``budget`` into KV cache, activations and what is left for the weights."""
    parsed = parse_budget(budget)
    if parsed.kind != "absolute":
        raise BudgetError(f"--kv-context subtracts the KV cache from a device budget, but --budget {parsed.spec} "
                          "is relative to the weights: give the device memory as a size (--budget 8GB)")
    total = int(parsed.value)
    kv, act = kv_cache_bytes(attention, context, batch), activation_bytes(attention, context, batch)
    weights = total - kv - act
    if weights <= 0:
        raise BudgetError(
            f"device budget {parsed.spec} = {format_bytes(total)} leaves nothing for the weights: the KV cache of "
            f"{batch} x {context} tokens takes {format_bytes(kv)} and the activations {format_bytes(act)} "
            f"({format_bytes(kv + act)} together): raise --budget or lower --kv-context/--kv-batch")
    return DeviceBudget(spec=parsed.spec, bytes=total, kv_cache_bytes=kv, activation_bytes=act,
                        weights_bytes=weights, context=context, batch=batch)


def attention_of(table) -> dict:
    """The table's attention values, or those of the config.json of the model it names (older tables)."""
    if attention := table.meta.get("attention"):
        return attention
    from quantplan.analysis.attention import attention_config

    model_id = table.meta.get("model_id", "")
    try:
        from transformers import AutoConfig

        return attention_config(AutoConfig.from_pretrained(model_id, local_files_only=True))
    except (OSError, ValueError) as err:
        raise ValueError(f"this table was analyzed before quantplan stored the attention layout, and the config "
                         f"of {model_id!r} cannot be read ({type(err).__name__}): re-run analyze to use "
                         "--kv-context") from None


def device_line(p) -> str:
    """The device budget split of a plan made with ``--kv-context``, as a line ending in a newline; else empty."""
    if (d := p.device) is None:
        return ""
    total = p.predicted.bytes + d.kv_cache_bytes + d.activation_bytes
    return (f"device: budget {d.spec} = {format_bytes(d.bytes)}; weights {format_bytes(p.predicted.bytes)} + KV cache "
            f"{format_bytes(d.kv_cache_bytes)} ({d.batch} x {d.context} tokens) + activations "
            f"{format_bytes(d.activation_bytes)} = {format_bytes(total)}\n")
