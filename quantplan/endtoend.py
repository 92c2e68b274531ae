"""EndToEnd: the planning steps that run the model (``quantplan run``): refinement rounds, verification.

``refine`` rounds of measured KL gradients (:mod:`planner.refine`) when asked for, then the
never-worse-than-all-4-bit check (:mod:`planner.verify`, on by default), both on the first
calibration batches (:meth:`EndToEnd.batches`: by default those covering :data:`DEFAULT_TOKENS`
tokens, so their cost does not grow with the calibration set the analysis reads), sharing one
loaded model, one 16-bit reference and one cache of 4-bit round trips. By default (``refine=None``) the verified
plan is checked by :class:`planner.auto_refine.AutoRefine`: where 4-bit breaks the model badly,
the refinement runs by itself for a bounded number of rounds, is verified in turn, and the plan
with the lower measured calibration KL ships; one line says why and what it cost. ``refine=0``
turns that off. Whether asked for or automatic, the refined plan is weighed against the first one on
the calibration batches that follow the refinement's (:meth:`EndToEnd.held_back_choice`; as many
where there are): the refinement fits its own batches, so a comparison there favours it.
Under ``--max-memory`` the model is never loaded whole: the same steps run on measurements made block
by block from disk, the verification's KLs (:class:`analysis.stream_variants.StreamedKLs`) and the
refinement's gradient pass (:class:`analysis.stream_gains.StreamedGains`), the same numbers
(:class:`Measures` carries either pair). Where a cap is too small for the gradient pass, or the model's
gradient cannot stream, the automatic refinement is skipped with a line saying why (``--refine N`` is refused
before the analysis, :func:`quantplan.dry_run.check_streamed_run_fits`).
"""

from __future__ import annotations

import gc
import time
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from quantplan.analysis.config import AnalyzeConfig, calibration_of
from quantplan.analysis.equalize import apply_equalization, equalization_of
from quantplan.analysis.models import ModelSource, dtype_from_name, load_model
from quantplan.analysis.table import SensitivityTable
from quantplan.common.profile import stage
from quantplan.planner.auto_refine import AutoRefine
from quantplan.planner.config import PlanConfig
from quantplan.planner.plan_types import Plan

#: calibration tokens the end-to-end steps measure by default: the verification's candidates and the
#: refinement's gradients on the first windows covering them. Measured on SmolLM2-135M (benchmarks/README.md,
#: "Verification on the first 4096 tokens"): the verification ships the same plans at +10 % and +33 % on 4096
#: as on all 8192 calibration tokens, at ~0.65x the CPU time (the verification was the largest stage after the analysis)
DEFAULT_TOKENS = 4096

if TYPE_CHECKING:
    from quantplan.analysis.endtoend import GainsMeasure
    from quantplan.planner.verify import KLMeasure


@dataclass(frozen=True)
class Measures:
    """What the end-to-end steps measure with: the refinement's gradient pass and the verification's KLs, in a
    loaded model (:meth:`in_memory`) or block by block from disk (:meth:`streamed`)."""

    gains: GainsMeasure
    klds: KLMeasure
    progress: bool = True
    #: KLs on the calibration batches after those the refinement fits: they choose between the refined and the
    #: first plan (:meth:`EndToEnd.held_back_choice`); None: chosen on the fitted batches
    heldback: KLMeasure | None = None

    @classmethod
    def in_memory(cls, reference, cache, progress: bool = True, heldback=None) -> Measures:
        """Both in the loaded model of ``reference`` (a :class:`~analysis.reference.KLReference`), with ``cache``'s
        round trips; ``heldback``: a reference over the held-back batches, or None."""
        from quantplan.analysis.reference import InMemoryKLs
        from quantplan.planner.refine import in_memory_gains

        return cls(in_memory_gains(reference, cache, progress), InMemoryKLs(reference, cache), progress,
                   None if heldback is None else InMemoryKLs(heldback, cache))

    @classmethod
    def streamed(cls, source: ModelSource, analyze: AnalyzeConfig, fmt, max_batches: int | None) -> Measures:
        """Both block by block from ``source``'s safetensors under ``analyze.max_memory``."""
        from quantplan.analysis.stream_gains import StreamedGains
        from quantplan.analysis.stream_variants import StreamedKLs, StreamOptions

        options = StreamOptions(dtype=dtype_from_name(analyze.dtype), batch_size=analyze.batch_size,
                                max_batches=max_batches, device=analyze.device, max_memory=analyze.max_memory,
                                progress=analyze.progress)
        calibration = calibration_of(source, analyze)
        return cls(StreamedGains(source.path, calibration, fmt, options),
                   StreamedKLs(source.path, calibration, fmt, options), analyze.progress)


@dataclass(frozen=True)
class EndToEnd:
    """Which end-to-end steps run, and on how many calibration batches (:meth:`batches`)."""

    refine: int | None = None  # rounds; 0 = off; None = automatic (``auto``) after the verification
    verify: bool = True
    max_batches: int | None = None  # given: these many batches; None: those covering ``max_tokens``
    auto: AutoRefine = AutoRefine()
    max_tokens: int | None = DEFAULT_TOKENS  # None (with max_batches None): every calibration batch

    @property
    def active(self) -> bool:
        return bool(self.refine or self.verify)

    @property
    def may_refine(self) -> bool:
        """Whether a verified refinement can run: asked for (``--refine N``) or automatic (where 4-bit breaks the model)."""
        return self.refine != 0 and self.verify

    def batches(self, analyze: AnalyzeConfig) -> int | None:
        """Calibration batches the refinement and the verification run on (None: all): ``max_batches`` where
        given, else the first batches holding ``max_tokens`` tokens in windows of ``analyze.seq_len``."""
        if self.max_batches is not None or self.max_tokens is None:
            return self.max_batches
        windows = max(1, self.max_tokens // max(analyze.seq_len, 1))
        return -(-windows // max(analyze.batch_size, 1))

    def plan(self, source: ModelSource, analyze: AnalyzeConfig, table: SensitivityTable, budget,
             config: PlanConfig, *, shared=None) -> Plan:
        """``config.plan`` (or the refinement) then the verification, sharing one model and reference
        (``shared``: the run's :class:`~quantplan.shared_model.SharedModel`, borrowed instead of loading)."""
        chosen = config.plan(table, budget)  # fails fast on a bad budget before loading the model
        if not self.active:
            return chosen
        from quantplan.analysis.formats import format_from_dict
        from quantplan.analysis.reference import KLReference
        from quantplan.analysis.simulate import QuantCache

        if analyze.max_memory and equalization_of(table.meta):
            raise ValueError("this table was measured on channel-scaled weights (quantplan's equalization), which the "
                             "streamed end-to-end checks do not read yet: run without --max-memory, or analyze with "
                             "--no-equalize")
        if analyze.max_memory:
            with stage("end-to-end checks (streamed)"):
                return self.checks(table, budget, config,
                                   Measures.streamed(source, analyze, format_from_dict(chosen.quant), self.batches(analyze)))
        packed = None
        borrowed = shared is not None and shared.serves(analyze.dtype, analyze.device)
        if borrowed:
            model, packed = shared.get(), shared.packed
        else:
            with stage("load model"):
                model = load_model(source, dtype=dtype_from_name(analyze.dtype), device=analyze.device)
                apply_equalization(model, equalization_of(table.meta))  # the weights the table measured
        calibration = calibration_of(source, analyze)
        reference = KLReference(model, calibration, analyze.batch_size, self.batches(analyze), progress=analyze.progress)
        heldback = self.heldback_reference(model, calibration, analyze)
        if borrowed:  # the analysis' 16-bit states of these batches: the 16-bit runs over them are not run again
            for lent_to in (reference, heldback) if heldback is not None else (reference,):
                shared.hidden.lend(lent_to, calibration)
        cache = QuantCache(model, format_from_dict(chosen.quant), packed)
        chosen = self.run_checks(table, budget, config, model, calibration, reference=reference, cache=cache,
                                 progress=analyze.progress, heldback=heldback)
        del model, reference, cache
        gc.collect()
        return chosen

    def heldback_reference(self, model, calibration, analyze: AnalyzeConfig):
        """A :class:`~analysis.reference.KLReference` over the calibration batches after the refinement's (as many,
        where there are), which choose between the refined and the first plan; None where no refinement can run or no
        batch is left (``--end-to-end-batches all``, a small calibration set)."""
        from quantplan.analysis.reference import KLReference

        count = self.batches(analyze)
        if not self.may_refine or count is None or calibration.num_batches(analyze.batch_size) <= count:
            return None
        return KLReference(model, calibration, analyze.batch_size, count, progress=analyze.progress, first_batch=count)

    def run_checks(self, table: SensitivityTable, budget, config: PlanConfig, model, calibration, *, reference,
                   cache, progress: bool = True, heldback=None) -> Plan:
        """The end-to-end steps on a loaded model (what :meth:`plan` runs; benchmarks call it directly); ``heldback``:
        the reference of :meth:`heldback_reference`, or None."""
        return self.checks(table, budget, config, Measures.in_memory(reference, cache, progress, heldback))

    def checks(self, table: SensitivityTable, budget, config: PlanConfig, measures: Measures) -> Plan:
        """The refinement (asked for), the verification, then the automatic refinement where it fires, all on
        ``measures``: one sequence of steps, in memory or streamed."""
        from quantplan.planner.refine import refine
        from quantplan.planner.verify import verify

        first = None
        if self.refine and self.verify and measures.heldback is not None:  # what ships without --refine, to choose
            with stage("verification"):
                unrefined = _replanned(config, table, budget)
                first = verify(table, unrefined, measure=measures.klds, siblings=siblings_of(table, config, unrefined),
                               progress=measures.progress)
        if self.refine:
            with stage("refinement"):
                chosen = refine(table, budget, config=config, rounds=self.refine, gains=measures.gains,
                                progress=measures.progress)
        else:
            chosen = _replanned(config, table, budget)
        if not self.verify:
            return chosen
        with stage("verification"):
            siblings = {} if self.refine else siblings_of(table, config, chosen)  # the refined plan stands alone
            chosen = verify(table, chosen, measure=measures.klds, siblings=siblings, progress=measures.progress)
        if first is not None and chosen.checks.refinement is not None:  # None: the check fell back to a heuristic
            chosen = self.held_back_choice(table, first, chosen, chosen.checks.refinement, measures)
        if self.refine is None:
            chosen = self.refine_when_broken(table, budget, config, chosen, measures)
        return chosen

    def held_back_choice(self, table: SensitivityTable, first: Plan, refined: Plan, record, measures: Measures) -> Plan:
        """The refined or the first plan, whichever has the lower KL on the held-back calibration batches (the first
        on a tie), with ``record`` (the refinement's) saying which shipped and what was measured; one line says so.

        The refinement fits the batches the verification measures, so a comparison there favours it: on SmolLM2 at
        +33 % it lowered the KL on its batches (0.1030 -> 0.1010) and raised it on the next ones (0.1005 -> 0.1045) and
        on held-out text (68.0 % -> 67.0 % recovery); at +10 % its gain held on all three (benchmarks/README.md)."""
        from quantplan.planner.baselines import plan_keep_set
        from quantplan.planner.verify import variant_configs

        labels = {"first plan": first, "refined": refined}
        measured = measures.heldback(variant_configs({k: plan_keep_set(table, p) for k, p in labels.items()}))
        kld = {label: float(v) for label, v in measured.kld.items()}
        shipped = kld["refined"] < kld["first plan"]
        print(f"quantplan: on {measured.tokens} held-back calibration tokens the refined plan's KL is "
              f"{kld['refined']:.4g} against the first plan's {kld['first plan']:.4g} nats/token: "
              f"the {'refined' if shipped else 'first'} plan ships")
        winner = refined if shipped else first
        record = replace(record, shipped=shipped, heldback_kld=kld, heldback_tokens=measured.tokens)
        return replace(winner, checks=replace(winner.checks, refinement=record))

    def refine_if_broken(self, table, budget, config, verified: Plan, model, calibration, shared: dict) -> Plan:
        """:meth:`refine_when_broken` on a loaded model (``shared``: reference, cache, progress and heldback, as
        :meth:`run_checks` takes them; ``model`` and ``calibration`` are the reference's)."""
        return self.refine_when_broken(table, budget, config, verified,
                                       Measures.in_memory(shared["reference"], shared["cache"],
                                                          shared.get("progress", True), shared.get("heldback")))

    def refine_when_broken(self, table, budget, config, verified: Plan, measures: Measures) -> Plan:
        """The automatic refinement when ``self.auto`` fires on the verified plan; the better-measured plan.
        A streamed gradient pass that cannot run (a cap too small for it) skips it, saying why."""
        from quantplan.analysis.stream_weights import StreamingUnsupported
        from quantplan.planner.refine import refine
        from quantplan.planner.verify import verify

        trigger = self.auto.trigger(verified)
        if trigger is None:
            return verified
        started = time.perf_counter()
        with stage("automatic refinement"):
            try:
                refined = refine(table, budget, config=config, rounds=self.auto.rounds, gains=measures.gains,
                                 progress=measures.progress)
            except StreamingUnsupported as err:
                print(f"quantplan: {trigger.sentence}, but the automatic refinement cannot run under --max-memory "
                      f"({err}): the verified plan ships")
                return verified
            refined = verify(table, refined, measure=measures.klds, progress=measures.progress)
        seconds = time.perf_counter() - started
        before, after = shipped_kld(verified), shipped_kld(refined)
        record = replace(refined.checks.refinement, trigger=trigger, seconds=seconds, shipped=after <= before)
        print(f"quantplan: {trigger.sentence}, so the plan was refined automatically: {self.auto.rounds} rounds, "
              f"{seconds:.0f} s; calibration KL {before:.4g} -> {after:.4g} nats/token"
              f"{'' if record.shipped or measures.heldback else ' (not better: the first plan ships)'}; "
              "--refine 0 turns this off")
        if measures.heldback is not None:
            return self.held_back_choice(table, verified, refined, record, measures)
        winner = refined if record.shipped else verified
        return replace(winner, checks=replace(winner.checks, refinement=record))


def _replanned(config: PlanConfig, table: SensitivityTable, budget) -> Plan:
    """``config.plan`` again, without repeating the warning of a budget that reaches the 16-bit size, which
    :meth:`EndToEnd.plan`'s first plan gave (a direct caller of :meth:`EndToEnd.run_checks` gets none)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"budget .* reaches the 16-bit size")
        return config.plan(table, budget)


def siblings_of(table: SensitivityTable, config: PlanConfig, chosen: Plan) -> dict[str, Plan]:
    """The single-format plans the verification measures beside a menu plan (:func:`planner.verify.single_format_siblings`),
    each under the plan's own byte budget."""
    from quantplan.planner.verify import single_format_siblings

    def plan_with(tiers):  # the plan's own byte budget (a relative one would be relative to the sibling's tier)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the plan's own warnings were given already
                sibling = replace(config.weights_only(), tiers=tiers).plan(table, chosen.budget.bytes)
        except ValueError:  # BudgetError included: this format alone does not fit the bytes, or a pin splits a set
            return None
        return as_menu_plan(sibling, chosen)

    return single_format_siblings(table, chosen, plan_with)


def as_menu_plan(sibling: Plan, chosen: Plan) -> Plan:
    """``sibling`` (planned with one format of ``chosen``'s menu) with the menu plan's identity: its budget,
    tiers and reference format (blocksize 64's all-4-bit, what ``+10%`` counts from and the report compares
    with), so the choices alone differ and a shipped sibling reads like any menu plan."""
    p = chosen.predicted
    predicted = replace(sibling.predicted, bytes_all_4bit=p.bytes_all_4bit, error_all_4bit=p.error_all_4bit,
                        over_all_4bit=sibling.predicted.bytes / p.bytes_all_4bit - 1)
    return replace(sibling, budget=chosen.budget, device=chosen.device, tiers=list(chosen.tiers), quant=chosen.quant,
                   formats=chosen.formats, predicted=predicted)


def shipped_kld(verified: Plan) -> float:
    """The measured calibration KL of what the verification chose to ship."""
    record = verified.checks.verification
    return record.calibration_kld[record.chosen]
