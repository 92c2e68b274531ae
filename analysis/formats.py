"""Candidate weight formats: small frozen values that quantize through bitsandbytes.

A format knows three things: how bitsandbytes would round a weight (``roundtrip``), how many
bytes the result occupies (``storage_bytes``, what a checkpoint holds; ``footprint_bytes``,
what ``model.get_memory_footprint()`` counts) and whether bitsandbytes can take a weight of a
given shape at all (``unsupported_reason``). Quantization itself is always bitsandbytes' own
``quantize_4bit`` / ``int8_vectorwise_quant``: nothing here re-implements a code book.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch

#: bytes of one element of a "16-bit" module
BYTES_16BIT = 2


@dataclass(frozen=True)
class FourBit:
    """A bitsandbytes 4-bit format (``Linear4bit``): NF4 or FP4, blockwise absmax scaling."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True

    @property
    def name(self) -> str:
        """``nf4`` at blocksize 64 (transformers' only one), ``nf4-bs32`` etc. otherwise: one name, one format."""
        return self.quant_type if self.blocksize == 64 else f"{self.quant_type}-bs{self.blocksize}"

    @property
    def bits(self) -> int:
        return 4

    def unsupported_reason(self, shape: tuple[int, ...]) -> str | None:
        """Why bitsandbytes cannot hold a weight of this shape in this format (None if it can)."""
        numel = math.prod(shape)
        if numel % self.blocksize:
            return (
                f"{numel} weight elements are not divisible by the {self.quant_type} blocksize "
                f"{self.blocksize}; bitsandbytes' CPU kernels fail on it, so it stays 16-bit"
            )
        return None

    def quantize(self, weight: torch.Tensor):
        """bitsandbytes' packed weight and quant state for ``weight``."""
        import bitsandbytes.functional as bnbf

        return bnbf.quantize_4bit(
            weight.contiguous(),
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            compress_statistics=self.double_quant,
        )

    def roundtrip(self, weight: torch.Tensor, quantized: tuple | None = None) -> tuple[torch.Tensor, int]:
        """The weight as bitsandbytes would restore it, and its exact checkpoint bytes (``quantized``: this
        format's :meth:`quantize` of ``weight`` where made already)."""
        import bitsandbytes.functional as bnbf

        packed, state = quantized if quantized is not None else self.quantize(weight)
        restored = bnbf.dequantize_4bit(packed, state).to(weight.dtype)
        state_bytes = sum(_tensor_bytes(v) for v in state.as_dict(packed=True).values())
        return restored, _tensor_bytes(packed) + state_bytes

    def storage_bytes(self, shape: tuple[int, ...]) -> int:
        """Checkpoint bytes without quantizing: packed nibbles + absmax (+ nested state) + metadata.

        Exact but for the JSON metadata, whose nested offset prints with a data-dependent number
        of digits (a few bytes); ``roundtrip`` reports the exact figure.
        """
        numel = math.prod(shape)
        blocks = math.ceil(numel / self.blocksize)
        packed = math.ceil(numel / 2)
        quant_map = 16 * 4
        if self.double_quant:
            state = blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + quant_map
        else:
            state = blocks * 4 + quant_map
        return packed + state + _quant_state_json_bytes(self, shape)

    def footprint_bytes(self, shape: tuple[int, ...]) -> int:
        """What ``get_memory_footprint`` counts: the packed uint8 parameter only."""
        return math.ceil(math.prod(shape) / 2)


@dataclass(frozen=True)
class Int8:
    """bitsandbytes LLM.int8 weights (``Linear8bitLt``), row-wise absmax, weight-only error.

    The measured error is that of the int8 weight alone (threshold 0): LLM.int8's mixed
    decomposition of outlier activation columns would lower it at run time.
    """

    @property
    def name(self) -> str:
        return "int8"

    @property
    def bits(self) -> int:
        return 8

    def unsupported_reason(self, shape: tuple[int, ...]) -> str | None:
        return None

    def roundtrip(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        import bitsandbytes.functional as bnbf

        quantized, row_stats, _ = bnbf.int8_vectorwise_quant(weight.contiguous())
        restored = bnbf.int8_vectorwise_dequant(quantized, row_stats).to(weight.dtype)
        return restored, self.storage_bytes(tuple(weight.shape))

    def storage_bytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) + shape[0] * 4

    def footprint_bytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape)


Format = FourBit | Int8

NF4 = FourBit("nf4")
FP4 = FourBit("fp4")
INT8 = Int8()

NF4_BS32 = FourBit("nf4", blocksize=32)

KNOWN = {"nf4": NF4, "nf4-bs32": NF4_BS32, "fp4": FP4, "int8": INT8}

#: blocksizes bitsandbytes' 4-bit kernels take (32 has CUDA kernels since bitsandbytes 0.49.2)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FOUR_BIT_NAME = re.compile(r"^(nf4|fp4)(?:-bs(\d+))?$")


def parse_formats(spec: str | list[str], blocksize: int = 64, double_quant: bool = True) -> list[Format]:
    """Formats from ``"nf4,nf4-bs32,int8"`` (or a list of names), validated, in the given order.

    A 4-bit name may carry its blocksize (``nf4-bs32``, ``fp4-bs128``); a bare ``nf4``/``fp4`` takes
    ``blocksize``. Each format may appear once (``nf4`` and ``nf4-bs64`` are the same one).
    """
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise ValueError("no format given: pass --formats with any of nf4, nf4-bs32, fp4, int8")
    formats = [_parse_one(n, blocksize, double_quant) for n in names]
    resolved = [f.name for f in formats]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"format listed twice in {names} (as {resolved}): list each once")
    return formats


def _parse_one(name: str, blocksize: int, double_quant: bool) -> Format:
    if name == "int8":
        return INT8
    match = _FOUR_BIT_NAME.match(name)
    if not match:
        raise ValueError(f"unknown format {name!r}: choose from {', '.join(KNOWN)} or nf4-bs<N>/fp4-bs<N> "
                         "(e.g. --formats nf4,nf4-bs32,int8)")
    size = int(match.group(2)) if match.group(2) else blocksize
    if size not in BLOCKSIZES:
        raise ValueError(f"format {name!r}: blocksize {size} is not one bitsandbytes takes; choose from "
                         f"{', '.join(map(str, BLOCKSIZES))}")
    return FourBit(match.group(1), blocksize=size, double_quant=double_quant)


def format_to_dict(fmt: Format) -> dict:
    """A json-able description of a format (stored in table and plan metadata)."""
    if isinstance(fmt, FourBit):
        return {"name": fmt.name, "bits": 4, "quant_type": fmt.quant_type, "blocksize": fmt.blocksize,
                "double_quant": fmt.double_quant}
    return {"name": fmt.name, "bits": 8}


def format_from_dict(d: dict) -> Format:
    """Inverse of :func:`format_to_dict` (also reads dicts written before names carried the blocksize)."""
    if d["name"] == "int8":
        return INT8
    return FourBit(d.get("quant_type", d["name"]), blocksize=d["blocksize"], double_quant=d["double_quant"])


def formats_of(meta_formats: list[dict]) -> dict[str, Format]:
    """``{name: format}`` from a table's or plan's ``formats`` metadata."""
    return {d["name"]: format_from_dict(d) for d in meta_formats}


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _quant_state_json_bytes(fmt: FourBit, shape: tuple[int, ...]) -> int:
    """Length of the json blob bitsandbytes stores beside a 4-bit weight (its exact layout)."""
    blob = {"quant_type": fmt.quant_type, "blocksize": fmt.blocksize, "dtype": "bfloat16", "shape": list(shape)}
    if fmt.double_quant:
        blob.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.123456789012345})
    return len(json.dumps(blob).encode())
