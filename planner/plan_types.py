"""Plan: the planner's result, saved as ``plan.json`` and read back by ``export``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantplan.analysis.table import TableMismatch

#: the format label of a module kept in 16-bit
KEEP = "16bit"
PLAN_VERSION = 1


@dataclass
class Plan:
    """Per-module format choices, the skip list that realises them, and what they should cost."""

    choices: dict[str, str]  # module -> "16bit" | "nf4" | "fp4" | "int8"
    reasons: dict[str, str]  # module -> why (measured / pinned / not quantizable / lm_head)
    skip_modules: list[str]  # llm_int8_skip_modules, full names
    budget: dict  # {"spec": "+10%", "bytes": ...}
    objective: str
    tiers: list[str]
    predicted: dict  # bytes, footprint_bytes, error, bytes_all_4bit, error_all_4bit, bytes_16bit, over_all_4bit
    table_hash: str
    model_id: str
    model_fingerprint: str
    quant: dict = field(default_factory=dict)  # the 4-bit format: name, blocksize, double_quant
    vllm_safe: bool = False
    checks: dict = field(default_factory=dict)  # end-to-end refinement and verification, when run

    @property
    def kept(self) -> list[str]:
        return [n for n, c in self.choices.items() if c == KEEP]

    def bnb_config_code(self, compute_dtype: str = "bfloat16") -> str:
        """A ready-to-paste ``BitsAndBytesConfig(...)`` for this plan."""
        skip = ",\n        ".join(json.dumps(s) for s in self.skip_modules)
        return (
            "import torch\nfrom transformers import BitsAndBytesConfig\n\n"
            "quantization_config = BitsAndBytesConfig(\n"
            "    load_in_4bit=True,\n"
            f"    bnb_4bit_quant_type={json.dumps(self.quant.get('name', 'nf4'))},\n"
            f"    bnb_4bit_use_double_quant={self.quant.get('double_quant', True)},\n"
            f"    bnb_4bit_compute_dtype=torch.{compute_dtype},\n"
            f"    llm_int8_skip_modules=[\n        {skip},\n    ],\n)\n"
        )

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, **asdict(self), "bnb_config": self.bnb_config_code()}

    def save(self, path: str | Path) -> Path:
        """Write plan.json (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan.json written by :meth:`save`."""
        path = Path(path)
        if path.is_dir():
            path = path / "plan.json"
        if not path.is_file():
            raise FileNotFoundError(f"no plan at {path}: run `quantplan plan` (or `quantplan run`) first")
        data = json.loads(path.read_text())
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"{path} is a plan of format version {data.get('version')}, expected {PLAN_VERSION}")
        data.pop("version")
        data.pop("bnb_config", None)
        return cls(**data)

    def check_model(self, model_fingerprint: str) -> None:
        """Refuse a plan made for another model."""
        if self.model_fingerprint and model_fingerprint != self.model_fingerprint:
            raise TableMismatch(
                f"this plan was made for another model ({self.model_id}, {self.model_fingerprint}; "
                f"given {model_fingerprint}): plan again from this model's sensitivity table"
            )
