"""What a model's KV cache and activations depend on, read from its config at analysis time.

The planner sizes the KV cache of a device budget (``--kv-context``) from the table alone, never
loading the model, so the analysis stores these few config values in the table's metadata
(``meta["attention"]``): layer count, attention and KV heads, head size, hidden and MLP sizes,
vocabulary, per-layer attention types (``layer_types``: full, sliding, chunked), the sliding
window, and for cross-attention models (Mllama) which layers attend to the image and how many
vision tokens they cache. A vision-language model's values are its text model's.
"""

from __future__ import annotations

#: text-config attributes the KV-cache and activation model reads (planner.kv_cache)
ATTENTION_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "hidden_size", "intermediate_size", "vocab_size", "sliding_window", "use_sliding_window",
                  "layer_types", "attention_chunk_size", "cross_attention_layers")


def attention_config(config) -> dict:
    """The JSON-ready attention values of a transformers ``config`` (its text config for a VLM)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    out = {}
    for key in ATTENTION_KEYS:
        value = getattr(text, key, None)
        if value is not None:
            out[key] = list(value) if isinstance(value, list | tuple) else value
    if out.get("cross_attention_layers"):
        out["cross_attention_tokens"] = cross_attention_tokens(config)
    return out


def cross_attention_tokens(config) -> int:
    """Vision tokens one image puts in each cross-attention layer's cache (Mllama: tiles x (patches + 1)).

    Llama 3.2 Vision (560-pixel tiles of 14-pixel patches, 4 tiles): 4 x (40² + 1) = 6404.
    """
    vision = getattr(config, "vision_config", None)
    if vision is None:
        raise ValueError(f"{type(config).__name__} has cross-attention layers but no vision_config: "
                         "quantplan cannot size their KV cache")
    patches = (vision.image_size // vision.patch_size) ** 2 + 1  # + the class token
    return int(getattr(vision, "max_num_tiles", 1) * patches)
