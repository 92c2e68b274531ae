"""Vision-language processors without torchvision: the folder's processor class, minus its video half.

transformers 5 builds every part of a processor, the video processor included, and its video
processors need torchvision even when only images go in (huggingface/transformers#48558);
Pixtral's processor module imports the torchvision image processor for a helper. On a CPU-only torch the
torchvision wheels from PyPI (CUDA builds) do not load, so a Qwen2-VL, Qwen2.5-VL, SmolVLM or
Pixtral folder as the hub holds it cannot be loaded by ``AutoProcessor`` there.

This module builds the same processor class without its video half: a subclass whose
``__init__`` takes no ``video_processor`` (transformers derives a processor's parts from that
signature), given the folder's image processor (the PIL backend, which needs no torchvision),
tokenizer, chat template and processor options (``processor_config.json``).
Its class name stays the original one, so ``save_pretrained`` writes a folder that loads the full
processor wherever torchvision is installed.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from pathlib import Path

VIDEO = "video_processor"
_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def load_image_only_processor(path: str, config):
    """The folder's processor, built from its image processor and tokenizer without the video half."""
    from transformers import AutoImageProcessor, AutoTokenizer

    processor_class = image_only_class(real_processor_class(processor_class_name(path, config)))
    saved, _ = processor_class.get_processor_dict(path)  # processor options and the chat template
    named = inspect.signature(processor_class.__init__).parameters
    options = {k: v for k, v in saved.items() if k in named and k not in processor_class.get_attributes()}
    return processor_class(image_processor=AutoImageProcessor.from_pretrained(path),
                           tokenizer=AutoTokenizer.from_pretrained(path), **options)


def processor_class_name(path: str, config) -> str:
    """The processor class the folder names (``processor_class``), else the model type's default."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    for file in _CONFIG_FILES:
        if (Path(path) / file).is_file():
            name = json.loads((Path(path) / file).read_text()).get("processor_class")
            if name:
                return name
    name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if not name:
        raise ValueError(f"transformers knows no processor for model type {config.model_type!r}")
    return name


def real_processor_class(name: str):
    """The class itself, also where transformers hands out a placeholder for a missing backend."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name
    from transformers.models.auto.tokenization_auto import model_type_to_module_name

    found = processor_class_from_name(name)
    if found is not None and not getattr(found, "is_dummy", False):
        return found
    for model_type, class_name in PROCESSOR_MAPPING_NAMES.items():
        if class_name == name:
            return getattr(_processing_module(model_type_to_module_name(model_type)), name)
    raise ValueError(f"transformers has no processor class {name!r}")


def _processing_module(module: str):
    """``transformers.models.<module>.processing_<module>``, also where it imports the torchvision image
    processor module for a helper (Pixtral's: a token-count size helper): the PIL module, which
    defines the same helpers, stands in for it while the processing module loads."""
    name, package = f"transformers.models.{module}.processing_{module}", f"transformers.models.{module}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "torchvision":
            raise
    fast = f"{package}.image_processing_{module}"
    sys.modules[fast] = importlib.import_module(f"{package}.image_processing_pil_{module}")
    try:
        return importlib.import_module(name)
    finally:
        del sys.modules[fast]


def image_only_class(base):
    """``base`` without its ``video_processor`` part (``base`` itself when it has none)."""
    if VIDEO not in base.get_attributes():
        return base
    signature = inspect.signature(base.__init__)
    params = [p for n, p in signature.parameters.items() if n != VIDEO]
    keyword = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    own = signature.replace(parameters=params)

    def __init__(self, *args, **kwargs):
        arguments = own.bind(self, *args, **kwargs).arguments
        arguments.pop(next(iter(own.parameters)))  # self
        extra = arguments.pop(keyword, {}) if keyword else {}
        base.__init__(self, **arguments, **extra, **{VIDEO: None})
        self.video_processor = _video_defaults(base)

    __init__.__signature__ = own
    return type(base.__name__, (base,), {"__init__": __init__, "__qualname__": f"ImageOnly{base.__name__}",
                                         "__module__": __name__, "__doc__": f"{base.__name__} for images only."})


def _video_defaults(base):
    """The default video processor when it builds without torchvision (some ``apply_chat_template``\\ s
    read its frame defaults), else None."""
    module = base.__module__.replace(".processing_", ".video_processing_")
    try:
        return getattr(importlib.import_module(module), base.__name__.replace("Processor", "VideoProcessor"))()
    except Exception:  # the video module imports torchvision itself: images need none of it
        return None
