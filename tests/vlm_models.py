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

from quantplan.analysis.vision import SHIPPED_IMAGES

VOCAB = 512
HIDDEN = 64
#: text hyper-parameters shared by every tiny language model
TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
#: vision hyper-parameters shared by the ViT-style towers (CLIP, SigLIP, Pixtral)
VISION = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=56, patch_size=14)


def save_tiny_vlm(arch: str, folder: Path, seed: int = 0, layers: int | None = None, **options) -> Path:
    """Build the tiny ``arch`` model plus processor and save both to ``folder``.

    ``layers``: blocks of the vision tower and of the language model each (Qwen2-VL, Qwen2.5-VL, Mllama, LLaVA;
    default 2, Mllama's its own: :func:`_mllama`). ``options`` go to the builder (LLaVA's ``feature_layer``).
    """
    torch.manual_seed(seed)
    model, processor = BUILDERS[arch](**({} if layers is None else {"layers": layers}), **options)
    model.to(torch.bfloat16).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# -- one builder per architecture: (model, processor) ----------------------------------------


def _qwen2_vl(version: str = "2", layers: int = 2):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    special = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    tokenizer = word_tokenizer(special)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    text = dict(TEXT, num_hidden_layers=layers, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "2":
        vision = dict(depth=layers, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=4, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **tokens))
    else:
        vision = dict(depth=layers, hidden_size=HIDDEN, intermediate_size=128, num_heads=4, out_hidden_size=HIDDEN,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=list(range(1, layers, 2)))
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens))
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    processor = _processor_class(Qwen2VLProcessor)(image_processor=images, tokenizer=tokenizer,
                                                   chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    return model, processor


def _qwen2_5_vl(layers: int = 2):
    return _qwen2_vl("2.5", layers)


def _qwen3_vl(layers: int = 2):
    """Qwen3-VL: a Qwen2-VL-style tower whose deepstack mergers feed block outputs into the first text layers
    (the processor: quantplan's image-only twin of ``Qwen3VLProcessor``, as it loads a hub folder here)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from quantplan.analysis.processors import image_only_class, real_processor_class

    special = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    tokenizer = word_tokenizer(special)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    text = dict(TEXT, num_hidden_layers=layers, head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    vision = dict(depth=layers, hidden_size=HIDDEN, intermediate_size=128, num_heads=4, out_hidden_size=HIDDEN,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"]))
    images = Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=128 * 128, patch_size=16, merge_size=2,
                                      temporal_patch_size=2)
    processor = image_only_class(real_processor_class("Qwen3VLProcessor"))(
        image_processor=images, tokenizer=tokenizer,
        chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    return model, processor


def _mllama(layers: int | None = None):
    """Llama 3.2 Vision layout. Default: three text layers, the middle one a cross-attention layer; two local
    and one global vision layer. ``layers``: that many text layers (cross-attention at 1 and ``layers`` - 3)
    and local vision layers, ``layers`` // 4 global ones, intermediate outputs of local layers 1 and the last."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = word_tokenizer(["<|image|>", "<|python_tag|>"])
    text, local, global_, cross, kept = 3, 2, 1, [1], [0]
    if layers is not None:
        if layers < 4:
            raise ValueError(f"a tiny Mllama with layers= takes 4 or more, not {layers}")
        text, local, global_, cross, kept = layers, layers, layers // 4, [1, layers - 3], [1, layers - 1]
    config = MllamaConfig(
        text_config=dict(TEXT, num_hidden_layers=text, cross_attention_layers=cross, vocab_size=VOCAB),
        vision_config=dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=local,
                           num_global_layers=global_, attention_heads=4, image_size=28, patch_size=14,
                           max_num_tiles=4, intermediate_layers_indices=kept,
                           vision_output_dim=(1 + len(kept)) * HIDDEN),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    model = MllamaForConditionalGeneration(config)
    images = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=chat_template("<|image|>"))
    return model, processor


def _llava(layers: int = 2, feature_layer: int | list[int] = -1):
    """LLaVA-1.5 layout: CLIP vision tower, two-layer MLP projector, Llama text model. ``feature_layer``: the
    tower's hidden state(s) the projector reads (LLaVA-1.5's own is -2; a list concatenates them)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = word_tokenizer(["<image>"])
    config = LlavaConfig(text_config=dict(TEXT, model_type="llama", num_hidden_layers=layers),
                         vision_config=dict(VISION, model_type="clip_vision_model", projection_dim=HIDDEN,
                                            num_hidden_layers=layers),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=feature_layer, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1, chat_template=chat_template("<image>"))
    return model, processor


def _llava_pixtral(layers: int = 2, feature_layer: int | list[int] = -1):
    """Pixtral-12B layout: LLaVA with a Pixtral vision tower (2D RoPE, variable image sizes); ``feature_layer`` as
    for :func:`_llava`.

    transformers declares PixtralProcessor to need torchvision, which quantplan's tests do not
    install; the tiny model gets a LlavaProcessor over the Pixtral image processor instead: the
    same pixel_values, image_sizes and [IMG] tokens, minus the [IMG_BREAK]/[IMG_END] row markers.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer = word_tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    vision = dict(VISION, model_type="pixtral", head_dim=16, num_hidden_layers=layers)
    config = LlavaConfig(text_config=dict(TEXT, model_type="llama", num_hidden_layers=layers), vision_config=vision,
                         image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
                         vision_feature_layer=feature_layer, vision_feature_select_strategy="full")
    model = LlavaForConditionalGeneration(config)
    images = PixtralImageProcessorPil(size={"longest_edge": 56}, patch_size=14)
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="full", image_token="[IMG]",
                               chat_template=chat_template("[IMG]"))
    return model, processor


def _idefics3(smolvlm: bool = False):
    """Idefics3 / SmolVLM: SigLIP tower, pixel-shuffle connector, Llama text model, image splitting."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMProcessor,
    )
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
        processor = _processor_class(SmolVLMProcessor)(image_processor=images, tokenizer=tokenizer,
                                                       image_seq_len=image_seq_len,
                                                       chat_template=chat_template("<image>"))
    else:
        processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=image_seq_len,
                                      chat_template=chat_template("<image>"))
    return model, processor


def _smolvlm():
    return _idefics3(smolvlm=True)


def save_smollm2_llava(folder: Path, smol_path: str) -> Path:
    """LLaVA composed from the trained SmolLM2-135M-Instruct and a tiny random CLIP tower.

    A structural stand-in, not a VLM anyone trained: the text half (30 layers, hidden 576) is
    real, so quantization meets real activation outliers there; the vision tower and projector
    are random, so image answers mean nothing. ``<image>`` is added to SmolLM2's tokenizer.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    text = AutoModelForCausalLM.from_pretrained(smol_path, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(smol_path)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    config = LlavaConfig(text_config=text.config.to_dict(), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_config=dict(VISION, model_type="clip_vision_model", projection_dim=HIDDEN),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         tie_word_embeddings=text.config.tie_word_embeddings)
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    model.generation_config = text.generation_config
    images = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
                "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1, chat_template=template)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


BUILDERS = {"qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl, "mllama": _mllama, "llava": _llava,
            "llava_pixtral": _llava_pixtral, "idefics3": _idefics3, "smolvlm": _smolvlm}


# -- processors without their video half -------------------------------------------------------


def _processor_class(base):
    """The image-only twin of ``base``: the same processor without its video half.

    transformers 5 builds every processor attribute, the video processor included, and refuses
    without torchvision even for images only (huggingface/transformers#48558); the torchvision
    wheels on PyPI are CUDA builds that do not load beside CPU torch. The twin drops the
    ``video_processor`` argument and nothing else, and is registered with AutoProcessor so
    plain ``AutoProcessor.from_pretrained`` (and quantplan) loads the saved folder. It is used
    with or without torchvision, so the tests do not depend on what is installed.
    """
    return IMAGE_ONLY[base.__name__]


def _image_only_processors() -> dict:
    from transformers import (
        AutoProcessor,
        Qwen2_5_VLConfig,
        Qwen2VLConfig,
        Qwen2VLProcessor,
        SmolVLMConfig,
        SmolVLMProcessor,
    )

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
        def __init__(self, image_processor, tokenizer, image_seq_len: int = 169, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, image_seq_len, chat_template=chat_template, **kwargs)
            from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

            self.video_processor = SmolVLMVideoProcessor()  # only read for its defaults by apply_chat_template

    AutoProcessor.register(Qwen2VLConfig, ImageOnlyQwen2VLProcessor, exist_ok=True)
    AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2VLProcessor, exist_ok=True)
    AutoProcessor.register(SmolVLMConfig, ImageOnlySmolVLMProcessor, exist_ok=True)
    return {"Qwen2VLProcessor": ImageOnlyQwen2VLProcessor, "SmolVLMProcessor": ImageOnlySmolVLMProcessor}


IMAGE_ONLY = _image_only_processors()


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
