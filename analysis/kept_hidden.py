"""The 16-bit last hidden states the analysis' calibration pass computes, kept for the run's verification.

A ``quantplan run`` runs the 16-bit base model over the calibration batches twice: the analysis'
calibration pass (its forward, and with Fisher scores the first batches' backward) over all of them, then the
never-worse verification (:mod:`planner.verify`) over the first ones as its 16-bit reference. Where
the logits are plain ``lm_head(last hidden state)`` (:func:`analysis.stream_head.plain_head`) the
verification's comparison reads only that state (:mod:`analysis.head_chunks`), so
:class:`KeptHidden` keeps it from the calibration pass for the first ``batches`` batches and lends
it to the verification's :class:`~analysis.reference.KLReference`, which then skips its 16-bit run
(one base forward per batch, a fifth of the verification's forwards) wherever no variant continues
that run's layers (:class:`analysis.shared_prefix.PrefixRuns`), and whose refinement rounds take their
16-bit logits from it (``lm_head`` of the state). Where a refinement may run (``--refine N``, or the
automatic one), as many batches after those are kept too, for the reference of the held-back choice
(:meth:`quantplan.endtoend.EndToEnd.heldback_reference`).

The states are the same numbers: the pass runs the same 16-bit weights over the same batches, in
pieces of whole sequences (:mod:`analysis.micro_batches`) joined back in order, and a sequence's
states do not depend on the others in its batch (bit for bit on the CPUs here, in fp32 and bf16;
tests/test_kept_hidden.py). They are lent only to a reference over the same calibration set
(fingerprint) and batch size. Memory: tokens × hidden × the model's element size for the kept
batches (SmolLM2's default run, 2 × 4096 tokens × 576 in bf16: 9.4 MB; a 70B model's 2 × 4096 × 8192:
134 MB), on the model's device, until the verification is done.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from .stream_head import plain_head


@dataclass
class KeptHidden:
    """Batch index -> the 16-bit base model's last hidden state, for batches ``0 .. batches - 1`` (None: all)."""

    batches: int | None = 0
    states: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    batch_size: int | None = None  # what the states were computed with (set by :meth:`attached`)
    calibration: str | None = None  # the calibration set's fingerprint (set by :meth:`attached`)

    def __post_init__(self):
        self._index: int | None = None
        self._pieces: list[torch.Tensor] = []

    def wants(self, index: int) -> bool:
        """Whether batch ``index`` is one to keep."""
        return self.batches is None or index < self.batches

    def attached(self, model: nn.Module, calibration, batch_size: int):
        """A context in which every call of ``model``'s base model adds its last hidden state to the batch begun
        with :meth:`start_batch`; nothing when there is nothing to keep or the head is not plain."""
        if self.batches == 0 or not plain_head(model):
            return nullcontext(self)
        return self._hooked(model, calibration, batch_size)

    @contextmanager
    def _hooked(self, model: nn.Module, calibration, batch_size: int):
        fingerprint = getattr(calibration, "fingerprint", None)
        if self.states and (batch_size, fingerprint) != (self.batch_size, self.calibration):
            self.states.clear()  # kept from other batches: they would never be lent
        self.batch_size, self.calibration = batch_size, fingerprint
        handle = getattr(model, model.base_model_prefix).register_forward_hook(self._keep)
        try:
            yield self
        finally:
            handle.remove()
            self._index, self._pieces = None, []

    def _keep(self, module, args, output) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        if self._index is not None and torch.is_tensor(hidden):
            self._pieces.append(hidden.detach())

    def start_batch(self, index: int) -> None:
        """The calibration pass begins batch ``index`` (pieces of an unfinished batch before are dropped)."""
        self._index = index if self.wants(index) else None
        self._pieces = []

    def commit_batch(self) -> None:
        """The batch finished: its pieces (whole sequences, in order) become its state."""
        if self._index is not None and self._pieces:
            pieces = self._pieces
            self.states[self._index] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        self._index, self._pieces = None, []

    def lend(self, reference, calibration) -> int:
        """Give the kept states to ``reference`` (a :class:`~analysis.reference.KLReference` over ``calibration``)
        when it covers the same calibration set in the same batch size; how many batches it got."""
        fingerprint = getattr(calibration, "fingerprint", None)
        if fingerprint is None or (reference.batch_size, fingerprint) != (self.batch_size, self.calibration):
            return 0
        first = reference.first_batch
        lent = [i for i in sorted(self.states) if first <= i < first + reference.count]
        for index in lent:
            reference.keep_hidden16(index - first, self.states[index])
        return len(lent)

    def clear(self) -> None:
        """Drop the kept states (their reader is done)."""
        self.states.clear()
