"""Plan: the planner's result, saved as ``plan.json`` and read back by ``export``.

A plan and its parts are frozen values: the budget it was made for (:class:`PlanBudget`), what it
should cost (:class:`Prediction`), and the end-to-end checks run on it (:class:`Checks`), which
``dataclasses.replace`` attaches. ``plan.json`` is format version 2 (reasons as kind + detail +
text); version-1 files (free-text reasons) are read too.
Version 3 adds the device budget (:class:`DeviceBudget`, ``--kv-context``) and the loader
compatibility (:class:`LoaderCompat`); both are absent (None) in older files, which still read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from quantplan.analysis.table import TableMismatch

from .reasons import Reason

#: the format label of a module kept in 16-bit
KEEP = "16bit"
PLAN_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


@dataclass(frozen=True)
class PlanBudget:
    """The budget as the user wrote it and the bytes it resolved to for this model."""

    spec: str
    bytes: int


@dataclass(frozen=True)
class DeviceBudget:
    """A device budget (``--kv-context``) split into KV cache, activations and the weights' share (planner.kv_cache)."""

    spec: str  # the device budget as written
    bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    weights_bytes: int  # bytes - kv_cache_bytes - activation_bytes: the budget the weights are planned under
    context: int
    batch: int


@dataclass(frozen=True)
class FusedAlternative:
    """The table planned at the plan's weight budget with ``--vllm-safe`` on or off (planner.compat)."""

    vllm_safe: bool
    bytes: int
    error: float
    kept: int


@dataclass(frozen=True)
class SkipListAlternative:
    """The table planned at a menu plan's weight budget with its reference format only (skip-list-only
    mode: one blocksize, a pasteable BitsAndBytesConfig), predicted from the table (planner.compat)."""

    tier: str  # the one 4-bit format, the plan's reference tier ("nf4" at blocksize 64)
    bytes: int
    error: float
    kept: int


@dataclass(frozen=True)
class LoaderCompat:
    """What loaders other than transformers make of the plan (planner.compat)."""

    vllm_safe: bool  # no fused q/k/v or gate/up set is split between 16-bit and 4-bit
    split_sets: tuple[tuple[str, ...], ...]  # the fused sets split between formats
    checkpoint_skip_modules: tuple[str, ...]  # the skip list in the names the checkpoint saves (what vLLM reads)
    alternatives: tuple[FusedAlternative, ...] = ()  # the same bytes planned without and with --vllm-safe
    blocksizes: dict[str, int] = field(default_factory=dict)  # 4-bit tier -> blocksize (from the table)
    skip_list_only: SkipListAlternative | None = None  # a menu plan's bytes planned with one format

    @classmethod
    def from_dict(cls, data: dict) -> LoaderCompat:
        skip = data.get("skip_list_only")
        return cls(bool(data["vllm_safe"]), tuple(tuple(s) for s in data["split_sets"]),
                   tuple(data["checkpoint_skip_modules"]),
                   tuple(FusedAlternative(**a) for a in data.get("alternatives", ())),
                   {k: int(v) for k, v in data.get("blocksizes", {}).items()},
                   SkipListAlternative(**skip) if skip else None)


@dataclass(frozen=True)
class Prediction:
    """What the plan should weigh and cost, next to all-4-bit and 16-bit (from the table)."""

    bytes: int  # predicted checkpoint bytes
    footprint_bytes: int  # predicted get_memory_footprint()
    error: float  # summed objective of the quantized modules
    bytes_all_4bit: int
    error_all_4bit: float
    bytes_16bit: int
    over_all_4bit: float  # bytes / bytes_all_4bit - 1


@dataclass(frozen=True)
class RefinementRound:
    """One round of :func:`planner.refine.refine`: modules restored before it and the KL it measured."""

    round: int
    kept_before: int
    kld_before: float


class TriggerKind(Enum):
    """Which check of the verified default plan started the automatic refinement (planner.auto_refine)."""

    LARGE_ALL_4BIT_KL = "large_all_4bit_kl"  # all-4-bit's calibration KL at or above the threshold
    PREDICTION_MISSED = "prediction_missed"  # measured / predicted recovery below the threshold


@dataclass(frozen=True)
class Trigger:
    """A check that fired: what it measured against its threshold."""

    kind: TriggerKind
    measured: float
    threshold: float

    @property
    def sentence(self) -> str:
        """Why, for people (one clause)."""
        if self.kind is TriggerKind.LARGE_ALL_4BIT_KL:
            return (f"all-4-bit's calibration KL {self.measured:.3f} nats/token is at least {self.threshold:g}: "
                    "4-bit breaks this model badly")
        return (f"the plan closed {self.measured:.0%} of the gap the table predicted (under {self.threshold:.0%}): "
                "first-order scores do not hold on this model")

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "measured": self.measured, "threshold": self.threshold}


@dataclass(frozen=True)
class Refinement:
    """The end-to-end refinement that chose the plan (planner.refine), or that ran and lost to the first plan."""

    rounds: int
    tokens: int
    history: tuple[RefinementRound, ...]
    objective_before: str
    trigger: Trigger | None = None  # why it ran by itself; None: asked for (--refine N)
    seconds: float | None = None  # wall time of the rounds, when timed (automatic refinement)
    shipped: bool = True  # False: the refinement measured worse than the first plan, which shipped
    #: the mean KL of the first and the refined plan on the held-back calibration batches that chose between them
    #: (labels "first plan", "refined"); None: chosen on the batches the refinement fitted (too few batches, streamed)
    heldback_kld: dict[str, float] | None = None
    heldback_tokens: int | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "trigger": self.trigger.to_dict() if self.trigger else None}

    @classmethod
    def from_dict(cls, data: dict) -> Refinement:
        trigger = data.get("trigger")
        return cls(**{**data, "history": tuple(RefinementRound(**h) for h in data["history"]),
                      "trigger": Trigger(TriggerKind(trigger["kind"]), float(trigger["measured"]),
                                         float(trigger["threshold"])) if trigger else None})


@dataclass(frozen=True)
class Verification:
    """The end-to-end check of the plan against all-4-bit and the heuristics (planner.verify)."""

    calibration_kld: dict[str, float]  # variant label -> mean KL from 16-bit, nats/token
    tokens: int
    all_4bit: str  # the label of the all-4-bit variant
    chosen: str  # the label of the variant shipped
    plans: tuple[str, ...] = ("plan",)  # labels of the planned candidates (the plan, its single-format siblings)

    @property
    def sibling_shipped(self) -> bool:
        """A single-format sibling of the plan ships (it measured lowest)."""
        return self.chosen in self.plans[1:]

    @property
    def plan_kld(self) -> float:
        """The measured calibration KL of the planned candidate that ships (the plan's when a heuristic won)."""
        return self.calibration_kld[self.chosen if self.chosen in self.plans else self.plans[0]]


@dataclass(frozen=True)
class Checks:
    """The end-to-end checks run on a plan; None where one did not run."""

    refinement: Refinement | None = None
    verification: Verification | None = None

    def to_dict(self) -> dict:
        result = {"refinement": self.refinement.to_dict()} if self.refinement is not None else {}
        if self.verification is not None:
            result["verification"] = asdict(self.verification)
        return result

    @classmethod
    def from_dict(cls, data: dict) -> Checks:
        refinement = data.get("refinement")
        verification = data.get("verification")
        return cls(Refinement.from_dict(refinement) if refinement is not None else None,
                   Verification(**{**verification, "plans": tuple(verification.get("plans", ("plan",)))})
                   if verification is not None else None)


@dataclass(frozen=True)
class Plan:
    """Per-module format choices, the skip list that realises them, and what they should cost."""

    choices: dict[str, str]  # module -> "16bit" | a tier ("nf4", "nf4-bs32", "fp4", "int8")
    reasons: dict[str, Reason]  # module -> why (planner.reasons)
    skip_modules: list[str]  # llm_int8_skip_modules, full names
    budget: PlanBudget
    objective: str
    tiers: list[str]
    predicted: Prediction
    table_hash: str
    model_id: str
    model_fingerprint: str
    quant: dict = field(default_factory=dict)  # the reference 4-bit format (tiers[0]): name, blocksize, double_quant
    vllm_safe: bool = False
    checks: Checks = Checks()  # end-to-end refinement and verification, when run
    device: DeviceBudget | None = None  # the device budget split, when planned with --kv-context
    compat: LoaderCompat | None = None  # loader compatibility, when computed (planner.compat)
    formats: dict = field(default_factory=dict)  # tier name -> format dict (analysis.formats.format_to_dict)
    bare_matrices: dict = field(default_factory=dict)  # matrices no Linear holds (MoE experts): 16-bit, name -> shape
    equalization: dict = field(default_factory=dict)  # the table's channel scales (analysis.equalize), {} for none

    @property
    def equalized(self) -> bool:
        """Whether the checkpoint holds channel-scaled weights (:mod:`analysis.equalize`), not the source's own."""
        return bool(self.equalization.get("groups")) and bool(self.used_formats)  # all 16-bit: the source as it is

    @property
    def kept(self) -> list[str]:
        return [n for n, c in self.choices.items() if c == KEEP]

    @property
    def used_formats(self) -> list[str]:
        """The formats the plan's quantized modules use, in tier order (16-bit not counted)."""
        used = set(self.choices.values()) - {KEEP}
        return [t for t in self.tiers if t in used] + sorted(used - set(self.tiers))

    @property
    def mixed_blocksizes(self) -> bool:
        """True when no BitsAndBytesConfig realises the plan's 4-bit modules: they use more than one format (a
        per-module blocksize menu), or one at a blocksize other than transformers' 64 (a menu plan that put
        every 4-bit module in ``nf4-bs32``). The exporter then writes the quantized tensors itself, and the
        verification simulates each module in its own format."""
        used = self.used_formats
        return len(used) > 1 or any(self.format_of(t).get("bits") == 4 and self.format_of(t).get("blocksize", 64)
                                    != 64 for t in used)

    def format_of(self, tier: str) -> dict:
        """The format dict of ``tier`` (``quant`` for the reference tier of plans saved before menus)."""
        if tier in self.formats:
            return self.formats[tier]
        if tier == self.quant.get("name"):
            return self.quant
        from quantplan.analysis.formats import format_to_dict, parse_formats

        return format_to_dict(parse_formats([tier])[0])  # a plan.json from before menus: the name says it all

    def bnb_config_code(self, compute_dtype: str = "bfloat16") -> str:
        """A ready-to-paste ``BitsAndBytesConfig(...)`` for this plan."""
        skip = ",\n        ".join(json.dumps(s) for s in self.skip_modules)
        note = ("# this plan uses per-module blocksizes (" + ", ".join(self.used_formats) + "), which no\n"
                "# BitsAndBytesConfig expresses: load the exported checkpoint. This config gives its skip list\n"
                "# with every other module at blocksize 64.\n" if self.mixed_blocksizes else "")
        if self.equalized:
            note += ("# the exported checkpoint holds channel-scaled weights (quantplan's equalization), so this\n"
                     "# config over the source weights gives another model: load the exported checkpoint.\n")
        return (
            note + "import torch\nfrom transformers import BitsAndBytesConfig\n\n"
            "quantization_config = BitsAndBytesConfig(\n"
            "    load_in_4bit=True,\n"
            f"    bnb_4bit_quant_type={json.dumps(self.quant.get('name', 'nf4'))},\n"
            f"    bnb_4bit_use_double_quant={self.quant.get('double_quant', True)},\n"
            f"    bnb_4bit_compute_dtype=torch.{compute_dtype},\n"
            f"    llm_int8_skip_modules=[\n        {skip},\n    ],\n)\n"
        )

    def to_dict(self) -> dict:
        """The plan.json form (format version 3)."""
        return {"version": PLAN_VERSION, "choices": dict(self.choices),
                "reasons": {n: r.to_dict() for n, r in self.reasons.items()},
                "skip_modules": list(self.skip_modules), "budget": asdict(self.budget), "objective": self.objective,
                "tiers": list(self.tiers), "predicted": asdict(self.predicted), "table_hash": self.table_hash,
                "model_id": self.model_id, "model_fingerprint": self.model_fingerprint, "quant": dict(self.quant),
                "vllm_safe": self.vllm_safe, "checks": self.checks.to_dict(), "formats": dict(self.formats),
                "device": asdict(self.device) if self.device else None,
                "compat": asdict(self.compat) if self.compat else None, "bare_matrices": dict(self.bare_matrices),
                "equalization": dict(self.equalization) or None, "bnb_config": self.bnb_config_code()}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """Read :meth:`to_dict`'s form, a version-2 one (no device budget or loader compatibility), or a
        version-1 plan.json (free-text reasons, read by their prefixes)."""
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"a plan of format version {version}, expected one of {READABLE_VERSIONS}: "
                             "plan again with this quantplan")
        read_reason = Reason.from_text if version == 1 else Reason.from_dict
        return cls(
            choices=dict(data["choices"]), reasons={n: read_reason(r) for n, r in data["reasons"].items()},
            skip_modules=list(data["skip_modules"]), budget=PlanBudget(**data["budget"]),
            objective=data["objective"], tiers=list(data["tiers"]), predicted=Prediction(**data["predicted"]),
            table_hash=data["table_hash"], model_id=data["model_id"], model_fingerprint=data["model_fingerprint"],
            quant=dict(data.get("quant", {})), vllm_safe=bool(data.get("vllm_safe", False)),
            checks=Checks.from_dict(data.get("checks", {})),
            device=DeviceBudget(**data["device"]) if data.get("device") else None,
            compat=LoaderCompat.from_dict(data["compat"]) if data.get("compat") else None,
            formats=dict(data.get("formats") or ({data["quant"]["name"]: data["quant"]} if data.get("quant") else {})),
            bare_matrices=dict(data.get("bare_matrices") or {}),
            equalization=dict(data.get("equalization") or {}))

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
        """Read a plan.json written by :meth:`save` (or by a quantplan that wrote format version 1)."""
        path = Path(path)
        if path.is_dir():
            path = path / "plan.json"
        if not path.is_file():
            raise FileNotFoundError(f"no plan at {path}: run `quantplan plan` (or `quantplan run`) first")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"cannot read the plan {path}: {err}") from None

    def check_model(self, model_fingerprint: str) -> None:
        """Refuse a plan made for another model."""
        if self.model_fingerprint and model_fingerprint != self.model_fingerprint:
            raise TableMismatch(
                f"this plan was made for another model ({self.model_id}, {self.model_fingerprint}; "
                f"given {model_fingerprint}): plan again from this model's sensitivity table"
            )
