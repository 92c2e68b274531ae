"""Tiny random-init vision-language models, saved with a working processor so from_pretrained loads them.

One builder per architecture, each through transformers' own config and model classes. Every
Linear has an element count divisible by 64 (bitsandbytes' CPU blocksize); patch embeddings
are convolutions (listed, never quantized). The tokenizer is word-level: the words of the
shipped prompts plus the architecture's image special tokens, so prompts tokenize to real ids.
Each processor carries a small chat template, so calibration takes the same path as for a hub
model (``apply_chat_template`` -> processor).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from analysis.vision import SHIPPED_IMAGES

VOCAB = 512
HIDDEN = 64
#: text hyper-parameters shared by every tiny language model
TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
#: vision hyper-parameters shared by the ViT-style towers (CLIP, SigLIP, Pixtral)
VISION = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=56, patch_size=14)


def save_tiny_vlm(arch: str, folder: Path, seed: int = 0) -> Path:
    """Build the tiny ``arch`` model plus processor and save both to ``folder``."""
    torch.manual_seed(seed)
    model, processor = BUILDERS[arch]()
    model.to(torch.bfloat16).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# -- one builder per architecture: (model, processor) ----------------------------------------


def _qwen2_vl(version: str = "2"):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen2VLProcessor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = word_tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.additional_special_tokens}
    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "2":
        vision = dict(depth=2, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=4, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **tokens))
    else:
        vision = dict(depth=2, hidden_size=HIDDEN, intermediate_size=128, num_heads=4, out_hidden_size=HIDDEN,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens))
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer,
                                 chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    return model, processor


def _qwen2_5_vl():
    return _qwen2_vl("2.5")


def _mllama():
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = word_tokenizer(["<|image|>", "<|python_tag|>"])
    # three text layers, the middle one a cross-attention layer; one local and one global vision layer
    config = MllamaConfig(
        text_config=dict(TEXT, num_hidden_layers=3, cross_attention_layers=[1], vocab_size=VOCAB),
        vision_config=dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=4, image_size=28, patch_size=14, max_num_tiles=4,
                           intermediate_layers_indices=[0], vision_output_dim=2 * HIDDEN),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    model = MllamaForConditionalGeneration(config)
    images = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=chat_template("<|image|>"))
    return model, processor


def _llava():
    """LLaVA-1.5 layout: CLIP vision tower, two-layer MLP projector, Llama text model."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = word_tokenizer(["<image>"])
    config = LlavaConfig(text_config=dict(TEXT, model_type="llama"),
                         vision_config=dict(VISION, model_type="clip_vision_model", projection_dim=HIDDEN),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1, chat_template=chat_template("<image>"))
    return model, processor


def _llava_pixtral():
    """Pixtral-12B layout: LLaVA with a Pixtral vision tower (2D RoPE, variable image sizes)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PixtralProcessor
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer = word_tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    vision = dict(VISION, model_type="pixtral", head_dim=16)
    config = LlavaConfig(text_config=dict(TEXT, model_type="llama"), vision_config=vision,
                         image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = LlavaForConditionalGeneration(config)
    images = PixtralImageProcessorPil(size={"longest_edge": 56}, patch_size=14)
    processor = PixtralProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14, spatial_merge_size=1,
                                 image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]",
                                 chat_template=chat_template("[IMG]"))
    return model, processor


def _idefics3(smolvlm: bool = False):
    """Idefics3 / SmolVLM: SigLIP tower, pixel-shuffle connector, Llama text model, image splitting."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, SmolVLMConfig,
                              SmolVLMForConditionalGeneration, SmolVLMProcessor)
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer = word_tokenizer(["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>",
                                *grid])
    config_class, model_class, image_class = ((SmolVLMConfig, SmolVLMForConditionalGeneration,
                                              SmolVLMImageProcessorPil) if smolvlm else
                                             (Idefics3Config, Idefics3ForConditionalGeneration,
                                              Idefics3ImageProcessorPil))
    config = config_class(text_config=dict(TEXT, model_type="llama"), vision_config=VISION, scale_factor=2,
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model = model_class(config)
    images = image_class(size={"longest_edge": 112}, max_image_size={"longest_edge": 56}, do_image_splitting=True)
    image_seq_len = (56 // 14) ** 2 // 2**2
    if smolvlm:
        processor = SmolVLMProcessor(image_processor=images, tokenizer=tokenizer, video_processor=None,
                                     image_seq_len=image_seq_len, chat_template=chat_template("<image>"))
    else:
        processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=image_seq_len,
                                      chat_template=chat_template("<image>"))
    return model, processor


def _smolvlm():
    return _idefics3(smolvlm=True)


BUILDERS = {"qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "mllama": _mllama, "llava": _llava,
            "llava_pixtral": _llava_pixtral, "idefics3": _idefics3, "smolvlm": _smolvlm}


# -- tokenizer and chat template ---------------------------------------------------------------


def word_tokenizer(special: list[str], vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: pad/bos/eos/unk, ``special`` image tokens, the shipped prompts' words, fillers."""
    base = ["<pad>", "<s>", "</s>", "<unk>"]
    words = sorted({w for p in _shipped_prompts() for w in re.findall(r"\w+|[^\w\s]+", p)} | {"user", "assistant", ":"})
    table = {t: i for i, t in enumerate(base + special + words)}
    table.update({f"w{i}": i for i in range(len(table), vocab)})
    if len(table) > vocab:
        raise ValueError(f"the tiny vocabulary needs {len(table)} entries, more than {vocab}")
    tokenizer = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in base + special])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=special)


def chat_template(image: str) -> str:
    """A minimal chat template that places ``image`` where an image content part is."""
    return ("{{ bos_token }}{% for message in messages %}{{ message['role'] }} : "
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image +
            " {% else %}{{ part['text'] }} {% endif %}{% endfor %}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


def _shipped_prompts() -> list[str]:
    return [entry["prompt"] for entry in json.loads((SHIPPED_IMAGES / "prompts.json").read_text())]
