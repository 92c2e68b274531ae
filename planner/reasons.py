"""Why a module has its format: a kind that code matches on, and a detail for people.

Code decides on :class:`ReasonKind` only (the baselines keep what no measurement chose, the
refinement re-decides what was measured, reports group by kind); the text shown in reports,
model cards and ``plan.json`` is rendered from the kind and the detail, so rewording a message
changes nothing but the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ReasonKind(Enum):
    """Where a module's format came from."""

    NOT_QUANTIZABLE = "not_quantizable"  # the analysis found no supported format (detail: why)
    LM_HEAD = "lm_head"  # kept 16-bit as transformers does by default
    PINNED_KEEP = "pinned_keep"  # --keep pattern (detail: the pattern)
    PINNED_QUANTIZE = "pinned_quantize"  # --quantize pattern (detail: the pattern)
    PRIOR = "prior"  # a rule prior (planner.priors; detail: the rule's why)
    MEASURED = "measured"  # the solver's choice from the table's scores (detail: the choice)
    REFINED = "refined"  # kept by end-to-end refinement (planner.refine; detail: round and gain)
    FALLBACK = "fallback"  # chosen by verification's fallback (planner.verify; detail: the variant)


#: the rendered text of each kind starts with this
PREFIXES = {
    ReasonKind.NOT_QUANTIZABLE: "not quantizable: ",
    ReasonKind.LM_HEAD: "lm_head: ",
    ReasonKind.PINNED_KEEP: "pinned: --keep ",
    ReasonKind.PINNED_QUANTIZE: "pinned: --quantize ",
    ReasonKind.PRIOR: "prior: ",
    ReasonKind.MEASURED: "measured: ",
    ReasonKind.REFINED: "refined: ",
    ReasonKind.FALLBACK: "fallback: ",
}

#: how reports name the kinds ("kept 16-bit by <label>"), in the order they list them
LABELS = {
    ReasonKind.PRIOR: "rule",
    ReasonKind.MEASURED: "measurement",
    ReasonKind.REFINED: "refinement",
    ReasonKind.FALLBACK: "verification fallback",
    ReasonKind.PINNED_KEEP: "pin",
    ReasonKind.PINNED_QUANTIZE: "--quantize pin",
    ReasonKind.NOT_QUANTIZABLE: "not quantizable",
    ReasonKind.LM_HEAD: "lm_head",
}

#: the modules no measurement chose: every compared variant keeps them as the plan does
FIXED_KINDS = frozenset({ReasonKind.NOT_QUANTIZABLE, ReasonKind.LM_HEAD, ReasonKind.PINNED_KEEP, ReasonKind.PRIOR})


@dataclass(frozen=True)
class Reason:
    """One module's reason: ``kind`` for code, ``detail`` for people; :attr:`text` renders both."""

    kind: ReasonKind
    detail: str = ""

    @property
    def text(self) -> str:
        return PREFIXES[self.kind] + self.detail

    def __str__(self) -> str:
        return self.text

    def to_dict(self) -> dict:
        """The plan.json form: kind and detail (read back), and the rendered text (for people)."""
        return {"kind": self.kind.value, "detail": self.detail, "text": self.text}

    @classmethod
    def from_dict(cls, data: dict) -> Reason:
        """Read :meth:`to_dict`'s form (the text is ignored: it is rendered again)."""
        try:
            return cls(ReasonKind(data["kind"]), str(data.get("detail", "")))
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"unreadable reason {data!r} in plan.json ({err}): plan again to rewrite it") from None

    @classmethod
    def from_text(cls, text: str) -> Reason:
        """A version-1 plan.json's free-text reason, by its known prefix (for the loader only)."""
        for kind, prefix in PREFIXES.items():
            if text.startswith(prefix):
                return cls(kind, text[len(prefix):])
        raise ValueError(f"unknown reason {text!r} in a version-1 plan.json: plan again to rewrite it")
