"""When the default plan runs the refinement by itself: the verification says 4-bit breaks the model badly.

The table's scores are first-order: each module measured against an otherwise fixed model, and
assumed to add up. Where 4-bit hurts a model mildly that holds well enough; where it breaks the
model badly the errors interact and the measured refinement does better. The verification
(:mod:`planner.verify`) already measures, on calibration data, the KL of all-4-bit and of the
plan, so two checks cost nothing extra:

- ``LARGE_ALL_4BIT_KL``: all-4-bit's calibration KL is at least ``max_all_4bit_kld`` nats/token.
  0.5 sits between SmolLM2-135M (0.33 on calibration, 0.33 held-out) and the badly broken models
  measured (``benchmarks/broken_standin.py``: 0.69 on calibration and held-out; the model of
  issue #14: 0.7-0.9 held-out), with a margin of 1.5x above the mild one.
- ``PREDICTION_MISSED``: the plan closed less than ``min_recovery_share`` of the share of the
  all-4-bit error the table predicted it would close (measured recovery 1 - KL_plan / KL_all-4-bit
  against predicted 1 - error / error_all-4-bit). On both models above the Fisher plan closed
  52-57 % of its prediction at +10 %, so this check does not separate them; it is a safety net for
  a plan that plainly misses (0.35: a third of the prediction, with a margin under 0.52).

Either one starts :func:`planner.refine.refine` for ``rounds`` rounds (one forward + backward pass
over the calibration batches each, plus one 16-bit forward), the refined plan is verified in turn,
and the better-measured of the two plans ships. Numbers: ``benchmarks/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan_types import Plan, Trigger, TriggerKind


@dataclass(frozen=True)
class AutoRefine:
    """The rule: thresholds of the two checks and the bounded number of rounds run when one fires."""

    rounds: int = 4
    max_all_4bit_kld: float = 0.5  # nats/token on calibration data
    min_recovery_share: float = 0.35  # measured recovery / predicted recovery

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"automatic refinement needs at least 1 round, got {self.rounds}")

    def trigger(self, verified: Plan) -> Trigger | None:
        """The first check that fires on a verified plan, or None (also when the plan was not verified)."""
        record = verified.checks.verification
        if record is None or "plan" not in record.calibration_kld:
            return None
        all_4bit = record.calibration_kld[record.all_4bit]
        if all_4bit >= self.max_all_4bit_kld:
            return Trigger(TriggerKind.LARGE_ALL_4BIT_KL, all_4bit, self.max_all_4bit_kld)
        share = recovery_share(verified)
        if share is not None and share < self.min_recovery_share:
            return Trigger(TriggerKind.PREDICTION_MISSED, share, self.min_recovery_share)
        return None


def recovery_share(verified: Plan) -> float | None:
    """Measured calibration recovery of the plan over the recovery the table predicted (None: nothing to compare)."""
    record = verified.checks.verification
    predicted = verified.predicted
    if record is None or predicted.error_all_4bit <= 0 or predicted.error >= predicted.error_all_4bit:
        return None
    all_4bit = record.calibration_kld[record.all_4bit]
    if all_4bit <= 0:
        return None
    measured = 1 - record.plan_kld / all_4bit
    return measured / (1 - predicted.error / predicted.error_all_4bit)
