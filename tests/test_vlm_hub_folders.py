"""Vision-language folders as the hub holds them, on a torch without torchvision.

A hub folder is saved part by part (model, tokenizer, image processor, chat template, the
processor's options and class name), never as one processor object; transformers 5 then builds
the named processor class with its video half, which needs torchvision even for images. quantplan
builds the same class for images only (analysis/processors.py). These tests use the real
transformers processor classes (not the image-only twins tests/vlm_models.py registers), so they
fail without that fallback.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor
from vlm_models import BUILDERS

from quantplan.analysis import NF4, analyze, load_model, load_processor, resolve_source
from quantplan.analysis.vision import calibration_for_model

#: per architecture: the processor class hub folders name, its saved options, the chat template file
HUB_FOLDERS = {
    "qwen2_vl": ("Qwen2VLProcessor", {}, "chat_template.json"),
    "smolvlm": ("SmolVLMProcessor", {"image_seq_len": 4}, "chat_template.jinja"),
    "llava_pixtral": ("PixtralProcessor", {"patch_size": 14, "spatial_merge_size": 1}, "chat_template.jinja"),
}

needs_no_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                                          reason="torchvision is installed: transformers builds the whole processor")


def save_hub_folder(arch: str, folder: Path) -> Path:
    """The tiny ``arch`` saved part by part, with the processor class and options hub folders carry."""
    processor_class, options, template_file = HUB_FOLDERS[arch]
    torch.manual_seed(0)
    model, processor = BUILDERS[arch]()
    model.to(torch.bfloat16).save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    template = processor.chat_template
    (folder / template_file).write_text(json.dumps({"chat_template": template}) if template_file.endswith(".json")
                                        else template)
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        saved = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**saved, "processor_class": processor_class}, indent=2))
    if options:
        (folder / "processor_config.json").write_text(json.dumps({**options, "processor_class": processor_class}))
    assert not (folder / "processor_config.json").exists() or options  # no processor saved as a whole
    return folder


@needs_no_torchvision
@pytest.mark.parametrize("arch", list(HUB_FOLDERS))
def test_image_only_processor_from_a_hub_folder(arch, tmp_path, capsys):
    if arch == "smolvlm":
        pytest.importorskip("num2words", reason="SmolVLMProcessor needs num2words (pip install num2words)")
    processor_class = HUB_FOLDERS[arch][0]
    folder = save_hub_folder(arch, tmp_path / "model")
    with pytest.raises(ImportError, match="(?i)torchvision"):
        AutoProcessor.from_pretrained(folder)  # what transformers alone does here
    source = resolve_source(str(folder))
    processor = load_processor(source)
    assert type(processor).__name__ == processor_class and "video_processor" not in type(processor).get_attributes()
    assert type(processor.image_processor).__name__.endswith("Pil")
    assert processor.chat_template
    load_processor(source)
    announced = [line for line in capsys.readouterr().out.splitlines() if "without torchvision" in line]
    assert len(announced) == 1 and processor_class in announced[0]

    model = load_model(source)
    calibration = calibration_for_model(model.config, processor, images="default", samples=2)
    rows = analyze(model, calibration, [NF4], progress=False).for_format("nf4")
    linear = rows[rows["kind"] == "Linear"]
    assert (linear["tokens"] > 0).all(), linear.loc[linear["tokens"] == 0, "name"].tolist()

    processor.save_pretrained(tmp_path / "saved")  # what the export writes: the real class name, no video half
    saved = json.loads((tmp_path / "saved" / "processor_config.json").read_text())
    assert saved["processor_class"] == processor_class and "video_processor" not in saved


@needs_no_torchvision
def test_cli_run_on_a_hub_folder_with_the_shipped_images(tmp_path):
    from quantplan.cli import main

    folder = save_hub_folder("qwen2_vl", tmp_path / "model")
    out = tmp_path / "job"
    code = main(["run", str(folder), "--images", "default", "--samples", "2", "--budget", "+50%", "--no-compare",
                 "--quiet", "--end-to-end-batches", "1", "--out", str(out)])
    assert code == 0
    assert json.loads((out / "checkpoint" / "processor_config.json").read_text())["processor_class"] == \
        "Qwen2VLProcessor"
    assert (out / "checkpoint" / "chat_template.jinja").is_file()
    # the checkpoint carries the video processor's configuration (the hub folder's preprocessor_config.json): only
    # torchvision is missing to load it whole, where before AutoProcessor found no video processor at all (OSError)
    with pytest.raises(ImportError, match="(?i)torchvision"):
        AutoProcessor.from_pretrained(out / "checkpoint")
    assert type(load_processor(resolve_source(str(out / "checkpoint")))).__name__ == "Qwen2VLProcessor"


def test_the_export_keeps_the_source_processor_files_its_image_only_processor_does_not_write(tmp_path):
    from quantplan.planner.export import keep_processor_files

    source, staging = tmp_path / "source", tmp_path / "staging"
    source.mkdir(), staging.mkdir()
    for name, content in [("preprocessor_config.json", {"size": 1}), ("video_preprocessor_config.json", {"fps": 2}),
                          ("processor_config.json", {"processor_class": "P", "video_processor": {"fps": 2}})]:
        (source / name).write_text(json.dumps(content))
    (staging / "preprocessor_config.json").write_text(json.dumps({"size": 3}))  # written by the export: kept
    (staging / "processor_config.json").write_text(json.dumps({"processor_class": "P", "image_processor": {}}))
    keep_processor_files(source, staging)
    assert json.loads((staging / "preprocessor_config.json").read_text()) == {"size": 3}
    assert json.loads((staging / "video_preprocessor_config.json").read_text()) == {"fps": 2}
    assert json.loads((staging / "processor_config.json").read_text()) == {
        "processor_class": "P", "image_processor": {}, "video_processor": {"fps": 2}}


@needs_no_torchvision
def test_a_streamed_vlm_run_ends_with_its_scoreboard(tmp_path):
    """`--max-memory` on a VLM: analysis and checks on images, block by block, then the scoreboard on held-out text
    through the language model alone (it failed there, after the checkpoint was written)."""
    from quantplan.cli import main

    folder = save_hub_folder("qwen2_vl", tmp_path / "model")
    out = tmp_path / "job"
    code = main(["run", str(folder), "--images", "default", "--samples", "2", "--budget", "+50%", "--quiet",
                 "--max-memory", "50MB", "--heldout-samples", "2", "--report", "quick", "--out", str(out)])
    assert code == 0
    assert (out / "checkpoint" / "config.json").is_file() and (out / "report.md").is_file()
