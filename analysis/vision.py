"""Calibration for vision-language models: image + prompt pairs through the model's own processor.

Pairs come from the photo set shipped in this package (``analysis/data/images``, each photo
with its prompt in ``prompts.json``) or from a folder of the user's images with one prompt
for all (or the folder's own ``prompts.json``). Each pair is formatted with the processor's
chat template (a user turn holding the image and the prompt, then the generation prompt) and
run through the processor, which returns whatever the model's forward needs: ``input_ids``,
``pixel_values`` and, per architecture, ``image_grid_thw`` and ``mm_token_type_ids``
(Qwen2-VL), ``aspect_ratio_ids`` and ``cross_attention_mask`` (Mllama), ``image_sizes``
(Pixtral), ``pixel_attention_mask`` (Idefics3). Pairs are ordered by a seeded shuffle;
batches join consecutive pairs only when their tensors have the same shapes, so no pad token
ever reaches the statistics. The fingerprint hashes the processed tensors themselves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .calibration import DATA_DIR, load_calibration

SHIPPED_IMAGES = DATA_DIR / "images"
DEFAULT_PROMPT = "Describe this image."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImagesRequired(ValueError):
    """A vision-language model was asked to calibrate without images."""


@dataclass
class ImageCalibrationSet:
    """Image + prompt pairs, processed on demand, with a fingerprint over the processed tensors."""

    processor: object
    pairs: list[tuple[Path, str]]  # (image file, prompt), in calibration order
    source: str
    seed: int
    _scan: dict | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        return self._scanned()["fingerprint"]

    @property
    def tokens(self) -> int:
        return self._scanned()["tokens"]

    @property
    def meta(self) -> dict:
        return {"source": self.source, "fingerprint": self.fingerprint, "kind": "image+prompt",
                "samples": len(self.pairs), "seed": self.seed, "tokens": self.tokens,
                "images": [p.name for p, _ in self.pairs], "prompts": sorted({q for _, q in self.pairs})}

    def num_batches(self, batch_size: int) -> int:
        return len(self._groups(batch_size))

    def batch_windows(self, batch_size: int) -> list[int]:
        """The image + prompt pairs in each batch :meth:`batches` makes (split where the processed shapes differ)."""
        return [len(group) for group in self._groups(batch_size)]

    def batches(self, batch_size: int):
        """Model keyword arguments, one dict per group of same-shaped pairs, always in the same order."""
        for group in self._groups(batch_size):
            samples = [self.sample(i) for i in group]
            yield {key: torch.cat([s[key] for s in samples]) if torch.is_tensor(samples[0][key]) else samples[0][key]
                   for key in samples[0]}

    def sample(self, index: int) -> dict:
        """The processor's output for pair ``index`` (batch dimension 1)."""
        image_path, prompt = self.pairs[index]
        return process_pair(self.processor, _open_image(image_path), prompt)

    def _groups(self, batch_size: int) -> list[list[int]]:
        """Consecutive pairs in chunks of ``batch_size``, split where tensor shapes differ."""
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1 (got {batch_size})")
        shapes = self._scanned()["shapes"]
        groups = []
        for start in range(0, len(shapes), batch_size):
            for index in range(start, min(start + batch_size, len(shapes))):
                if groups and index != start and shapes[index] == shapes[groups[-1][-1]]:
                    groups[-1].append(index)
                else:
                    groups.append([index])
        return groups

    def _scanned(self) -> dict:
        """Process every pair once: fingerprint, token count and per-pair shapes (tensors are not kept)."""
        if self._scan is None:
            digest, tokens, shapes = hashlib.sha256(), 0, []
            for index in range(len(self.pairs)):
                sample = self.sample(index)
                for key in sorted(sample):
                    value = sample[key]
                    digest.update(key.encode())
                    if torch.is_tensor(value):
                        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
                        digest.update(value.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
                    else:
                        digest.update(repr(value).encode())
                tokens += int(sample["input_ids"].numel())
                shapes.append(tuple((k, tuple(v.shape[1:])) for k, v in sorted(sample.items()) if torch.is_tensor(v)))
            self._scan = {"fingerprint": digest.hexdigest()[:16], "tokens": tokens, "shapes": shapes}
        return self._scan


def calibration_for_model(config, processor, *, images: str | None = None, prompt: str | None = None,
                          text_only: bool = False, calib: str | None = None, samples: int = 32,
                          seq_len: int = 256, seed: int = 0):
    """The calibration a model gets: image + prompt pairs for a VLM, text windows otherwise.

    ``images`` is a folder, an image file, or ``"default"`` for the shipped photo set. A
    vision-language model without ``images`` is an error unless ``text_only`` is set (then
    the language model is calibrated on text and the vision tower falls back to weight error).
    """
    vlm = is_vision_language(config)
    if images is not None and text_only:
        raise ValueError("--images and --text-only exclude each other: pass one of them")
    if images is not None and not vlm:
        raise ValueError(f"--images was given, but this model ({config.model_type}) takes no images: "
                         "drop --images (calibration then uses text, see --calib)")
    if images is None:
        if prompt is not None:
            raise ValueError("--prompt goes with --images: pass the images it asks about (--images DIR)")
        if vlm and not text_only:
            raise ImagesRequired(images_required_message(config))
        tokenizer = getattr(processor, "tokenizer", processor)
        positions = getattr(config.get_text_config(), "max_position_embeddings", None)
        return load_calibration(tokenizer, calib, samples, seq_len, seed, positions)
    if calib is not None:
        raise ValueError("--calib names a text source, but --images calibrates with images: pass one of them")
    return load_image_calibration(processor, images, prompt, samples=samples, seed=seed)


def is_vision_language(config) -> bool:
    """True for models that take images (a vision sub-config or an image-text-to-text model type)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return getattr(config, "vision_config", None) is not None or (
        getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def images_required_message(config) -> str:
    """What to tell a user who runs a vision-language model without images."""
    return (f"this is a vision-language model ({config.model_type}): calibrate it with images, e.g. "
            f"`quantplan run MODEL --images DIR --prompt \"{DEFAULT_PROMPT}\"` (DIR: a folder of .jpg/.png "
            f"files), or `--images default` for the shipped photo set with its prompts; `--text-only` "
            f"calibrates the language model on text only (the vision tower is then ranked by weight error)")


def load_image_calibration(processor, images: str | Path = "default", prompt: str | None = None, *,
                           samples: int | None = None, seed: int = 0) -> ImageCalibrationSet:
    """Read image + prompt pairs, order them by a seeded shuffle and keep ``samples`` of them."""
    if not hasattr(processor, "image_processor"):
        raise ValueError("this model's folder has no image processor (preprocessor_config.json): "
                         "calibrating with images needs the model's processor")
    pairs, source = image_prompt_pairs(images, prompt)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    if samples is not None:
        if samples < 1:
            raise ValueError(f"--samples must be >= 1 (got {samples})")
        order = order[:samples]  # fewer images than samples: use them all, each once
    return ImageCalibrationSet(processor, [pairs[i] for i in order], source, seed)


def image_prompt_pairs(images: str | Path = "default", prompt: str | None = None) -> tuple[list, str]:
    """``[(image file, prompt)]`` and a source label, from the shipped set, a folder or one file."""
    if images in (None, "default"):
        table = _prompt_table(SHIPPED_IMAGES)
        return [(SHIPPED_IMAGES / f, prompt or p) for f, p in table.items()], "default-images"
    path = Path(images).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise FileNotFoundError(f"--images {images}: no such folder or file (pass a folder of images, "
                                "or 'default' for the shipped photo set)")
    if not files:
        raise ValueError(f"--images {images} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
    table = _prompt_table(path) if path.is_dir() and (path / "prompts.json").is_file() and prompt is None else {}
    return [(f, prompt or table.get(f.name, DEFAULT_PROMPT)) for f in files], str(path)


def process_pair(processor, image, prompt: str) -> dict:
    """One image + prompt through the processor's chat template and the processor itself."""
    text, templated = format_prompt(processor, prompt)
    out = processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=not templated)
    return dict(out)


def format_prompt(processor, prompt: str) -> tuple[str, bool]:
    """The text for one image + prompt: the chat template's user turn if the processor has one."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    token = getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None)
    if token is None:
        raise ValueError("the processor has neither a chat template nor an image_token: cannot place the "
                         "image in the prompt (save the model's processor with its chat template)")
    return f"{token}{prompt}", False


def _prompt_table(folder: Path) -> dict[str, str]:
    entries = json.loads((folder / "prompts.json").read_text())
    table = {e["file"]: e["prompt"] for e in entries}
    missing = [f for f in table if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder / 'prompts.json'} names images that are not there: {missing[:3]}")
    return table


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")
