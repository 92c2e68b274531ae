"""quantplan.analysis.vision: image + prompt calibration (sources, determinism, batching, errors)."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoConfig
from vlm_models import save_tiny_vlm

from quantplan.analysis import NF4, analyze, load_model, load_processor, resolve_source
from quantplan.analysis.vision import (
    DEFAULT_PROMPT,
    SHIPPED_IMAGES,
    ImagesRequired,
    calibration_for_model,
    load_image_calibration,
)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    source = resolve_source(str(save_tiny_vlm("llava", tmp_path_factory.mktemp("llava") / "m")))
    return source, load_processor(source)


def test_shipped_set_is_seeded_and_fingerprinted_over_tensors(llava):
    _, processor = llava
    a = load_image_calibration(processor, "default", samples=4, seed=0)
    b = load_image_calibration(processor, "default", samples=4, seed=0)
    c = load_image_calibration(processor, "default", samples=4, seed=1)
    assert a.pairs == b.pairs and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    every = load_image_calibration(processor, "default", samples=100)
    assert len(every.pairs) == len(json.loads((SHIPPED_IMAGES / "prompts.json").read_text()))
    prompts = {e["file"]: e["prompt"] for e in json.loads((SHIPPED_IMAGES / "prompts.json").read_text())}
    assert all(prompt == prompts[path.name] for path, prompt in every.pairs)
    assert json.loads(json.dumps(a.meta)) == a.meta  # resume compares metadata after a json round trip
    assert a.meta["kind"] == "image+prompt" and a.meta["samples"] == 4


def test_user_folder_with_one_prompt(llava, tmp_path):
    _, processor = llava
    for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(SHIPPED_IMAGES / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    calibration = load_image_calibration(processor, str(tmp_path), "Describe this image.")
    assert sorted(p.name for p, _ in calibration.pairs) == ["chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert calibration.meta["prompts"] == ["Describe this image."]
    assert calibration.meta["source"] == str(tmp_path)
    other = load_image_calibration(processor, str(tmp_path), "What is this?")
    assert other.fingerprint != calibration.fingerprint  # the prompt is part of the processed tensors
    assert {q for _, q in load_image_calibration(processor, str(tmp_path)).pairs} == {DEFAULT_PROMPT}


def test_bad_image_sources(llava, tmp_path):
    _, processor = llava
    with pytest.raises(ValueError, match="holds no image"):
        load_image_calibration(processor, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_image_calibration(processor, str(tmp_path / "missing"))


def test_vlm_without_images_is_an_error_that_says_how(llava, tiny_source):
    source, processor = llava
    config = AutoConfig.from_pretrained(source.path)
    with pytest.raises(ImagesRequired, match=r"--images DIR --prompt .*--images default.*--text-only"):
        calibration_for_model(config, processor)
    with pytest.raises(ValueError, match="takes no images"):
        calibration_for_model(AutoConfig.from_pretrained(tiny_source.path), load_processor(tiny_source),
                              images="default")
    with pytest.raises(ValueError, match="--prompt goes with --images"):
        calibration_for_model(config, processor, prompt="Describe this image.")
    with pytest.raises(ValueError, match="exclude each other"):
        calibration_for_model(config, processor, images="default", text_only=True)


def test_batches_join_only_same_shaped_pairs(llava):
    source, processor = llava
    # shipped prompts differ in length: batches split where shapes differ, never pad
    mixed = load_image_calibration(processor, "default", samples=6)
    batches = list(mixed.batches(4))
    assert len(batches) == mixed.num_batches(4) >= 2
    assert sum(b["input_ids"].shape[0] for b in batches) == 6
    assert all(b["pixel_values"].shape[0] == b["input_ids"].shape[0] for b in batches)
    # one prompt for all: every pair has the same shapes and a batch of 4 is one forward
    same = load_image_calibration(processor, "default", DEFAULT_PROMPT, samples=4)
    assert same.num_batches(4) == 1 and next(same.batches(4))["input_ids"].shape[0] == 4
    model = load_model(source)
    batched = analyze(model, same, [NF4], batch_size=4, progress=False).for_format("nf4").set_index("name")
    single = analyze(model, same, [NF4], batch_size=1, progress=False).for_format("nf4").set_index("name")
    assert (batched["tokens"] == single["tokens"]).all()
    linear = batched["quantizable"]
    assert batched.loc[linear, "output_rel_error"].values == pytest.approx(
        single.loc[linear, "output_rel_error"].values, rel=0.05)
