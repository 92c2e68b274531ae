"""Side-by-side greedy generations: the same fixed prompts through every variant.

Text prompts go through the tokenizer's chat template when it has one (instruct models
answer in their trained format), as one left-padded batch. For a vision-language model one
more row asks "Describe this image." about a shipped photo. A failure is written into the
cell instead of stopping the comparison.
"""

from __future__ import annotations

import torch

from quantplan.analysis.calibration import DATA_DIR
from quantplan.common.batches import batch_to, model_device

PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
)
IMAGE_PROMPT = "Describe this image."
IMAGE_FILE = DATA_DIR / "images" / "astronaut.jpg"


def generate(model, processor, prompts=PROMPTS, max_new_tokens: int = 32) -> dict[str, str]:
    """``{prompt: greedy continuation}`` for each prompt (plus the image prompt for a VLM)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    answers = {}
    try:
        answers.update(_text(model, tokenizer, list(prompts), max_new_tokens))
    except Exception as err:  # report, do not stop: a variant that cannot generate is a finding
        answers.update({p: f"(generation failed: {type(err).__name__}: {err})" for p in prompts})
    if hasattr(processor, "image_processor"):
        answers[f"[image: {IMAGE_FILE.name}] {IMAGE_PROMPT}"] = _image(model, processor, max_new_tokens)
    return answers


def _text(model, tokenizer, prompts, max_new_tokens) -> dict[str, str]:
    texts = [_chat(tokenizer, p) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = pad
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=tokenizer.chat_template is None)
    finally:
        tokenizer.padding_side = side
    out = _greedy(model, batch, max_new_tokens, pad)
    return {p: tokenizer.decode(row, skip_special_tokens=True).strip() for p, row in zip(prompts, out, strict=True)}


def _image(model, processor, max_new_tokens) -> str:
    from PIL import Image

    try:
        image = Image.open(IMAGE_FILE).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": IMAGE_PROMPT}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        batch = processor(text=[text], images=[image], return_tensors="pt")
        tokenizer = processor.tokenizer
        out = _greedy(model, batch, max_new_tokens, tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(out[0], skip_special_tokens=True).strip()
    except Exception as err:
        return f"(generation failed: {type(err).__name__}: {err})"


def _chat(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def _greedy(model, batch, max_new_tokens, pad_token_id):
    batch = batch_to(batch, model_device(model))
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad_token_id, temperature=None, top_p=None, top_k=None)
    return out[:, batch["input_ids"].shape[1]:].cpu()

