"""Forward pre-hooks that stream what each Linear sees, so output error needs no stored activations.

For a Linear with weight W and inputs X, the output error of a rounded weight Ŵ is
``‖X(W−Ŵ)ᵀ‖² = tr(ΔW · XᵀX · ΔWᵀ)``: one Gram matrix ``XᵀX`` per input, accumulated batch by
batch, gives the exact output error of *every* candidate format afterwards without running
the tokens again. Linears fed the very same tensor (q/k/v, gate/up) share one Gram matrix.
Besides the Gram matrix a probe keeps each input channel's max |x| (outlier statistics), a
small sample of input rows (max abs output error), and counts of tokens and of non-finite
tokens (skipped and flagged, never poisoning the sums).
"""

from __future__ import annotations

import json
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quantplan.common.files import atomic_write_text, staged_file

from .finite_rows import finite_rows_absmax
from .gram import UpperGram, damaged, product_dtype, upper_elements
from .hooks import module_hooks


@dataclass
class InputStats:
    """Streaming statistics of one input tensor (shared by all Linears fed that tensor).

    Every batch accumulates straight into the totals: no second Gram matrix while a batch runs. A batch
    that stops midway therefore leaves them half-counted; :class:`InputProbe` knows when it is inside a
    batch and refuses to save then, so a flushed state never holds part of a batch (the in-memory pass
    lets a Ctrl-C finish the running batch first, :mod:`analysis.interrupts`; a streamed analysis reruns
    the whole block).
    The Gram matrix is kept as its blocks on and above the diagonal (:class:`analysis.gram.UpperGram`: half
    the multiply-adds and about half the memory of the full matrix).
    """

    gram: UpperGram  # Σ xᵀx over finite tokens
    channel_absmax: torch.Tensor  # [in] float32
    sample: torch.Tensor | None = None  # [<=sample_rows, in] float32, from the first batch
    tokens: int = 0
    nonfinite_tokens: int = 0

    @classmethod
    def empty(cls, width: int, device=None) -> InputStats:
        """Statistics of an input ``width`` wide before any token."""
        return cls(UpperGram.zeros(width, device), torch.zeros(width, dtype=torch.float32, device=device))

    def move_to(self, device) -> None:
        """Move the totals to ``device`` in place (statistics resumed onto the CPU, for a model on a GPU)."""
        self.gram = self.gram.to(device)
        self.channel_absmax = self.channel_absmax.to(device)

    def update(self, x: torch.Tensor, sample_rows: int, sample_stride: int | None = 0) -> None:
        """Add the finite rows of ``x`` to the totals (Gram matrix, channel max |x|, counts, first sample).

        The sample keeps every ``sample_stride``-th finite row (counted over the pass) while it has room: 0 for a
        stride from ``x``'s own rows (its whole batch), None to add nothing (a later batch).
        """
        product = product_dtype(x)
        flat = x.reshape(-1, x.shape[-1])  # bf16 activations stay bf16 where the Gram multiplies them so: no copies
        rows, nonfinite, absmax = finite_rows_absmax(flat if product == flat.dtype else flat.float())
        self.nonfinite_tokens += nonfinite
        self.gram.add(rows, product)
        if absmax is not None:  # a max of |x| is exact in any dtype
            torch.maximum(self.channel_absmax, absmax.float(), out=self.channel_absmax)
        if sample_stride is not None:
            self._add_sample(rows, sample_rows, sample_stride or max(1, x.shape[:-1].numel() // sample_rows))
        self.tokens += len(rows)

    def _add_sample(self, rows: torch.Tensor, sample_rows: int, stride: int) -> None:
        """Keep every ``stride``-th finite row, counted from the pass's first, until ``sample_rows``: the same rows
        whether the first batch comes whole or in micro-batches."""
        taken = 0 if self.sample is None else len(self.sample)
        if taken >= sample_rows or not len(rows):
            return
        picked = rows[(-self.tokens) % stride::stride][:sample_rows - taken].detach().cpu().float()
        self.sample = picked.clone() if self.sample is None else torch.cat([self.sample, picked])


@dataclass
class InputProbe:
    """Hooks the named Linears of a model and accumulates :class:`InputStats` per distinct input."""

    model: nn.Module
    names: list[str]
    sample_rows: int = 256
    owner: dict[str, str] = field(default_factory=dict)  # module -> module whose stats it shares
    stats: dict[str, InputStats] = field(default_factory=dict)  # keyed by owner
    batches_done: int = 0
    in_batch: bool = False  # a batch started and has not finished: the totals hold part of it

    def __post_init__(self):
        self._seen: dict[tuple, tuple] = {}
        self._paused: set[str] = set()
        self._sampling: dict[str, int] = {}  # owner -> the batch its sample is taken from
        self._stride = 0  # the sample's stride in this batch (0: from each call's own rows)

    def stats_for(self, name: str) -> InputStats:
        """Input statistics of a module (shared ones resolved)."""
        return self.stats[self.owner[name]]

    @contextmanager
    def attached(self):
        """Register the pre-hooks for the duration of the block."""
        with module_hooks(self.model, {n: self._hook(n) for n in self.names}, pre=True):
            yield self

    def start_batch(self, rows: int | None = None) -> None:
        """A batch begins: forget the tensors seen in the previous one; until :meth:`commit_batch` the totals
        hold part of a batch and :meth:`save` refuses. ``rows``: the batch's tokens, when it comes in micro-batches
        (:mod:`analysis.micro_batches`), so the input sample takes the rows it would take from the whole batch."""
        self._seen.clear()
        self.in_batch = True
        self._stride = max(1, rows // self.sample_rows) if rows else 0

    def commit_batch(self) -> None:
        """The batch ran to the end: its statistics are whole in the totals."""
        self.in_batch = False
        self.batches_done += 1

    @contextmanager
    def paused(self, name: str | None):
        """Inside the block the module's pre-hook ignores its calls: a caller that runs it in pieces (the lm_head
        in token chunks) passes the whole input to :meth:`observe` once instead."""
        self._paused.add(name)
        try:
            yield self
        finally:
            self._paused.discard(name)

    def _hook(self, name: str):
        def hook(module, args):
            if name not in self._paused:
                self.observe(name, args[0] if args else None)

        return hook

    def observe(self, name: str, x) -> None:
        """Accumulate ``x`` as the input of module ``name`` (what its pre-hook does; callers that run a
        module in pieces, such as the streamed lm_head in token chunks, pass the whole input once)."""
        if not isinstance(x, torch.Tensor):
            return
        key = (x.data_ptr(), tuple(x.shape))
        seen = self._seen.get(key)
        if seen is not None and seen[0]() is x:
            leader = seen[1]
            if self.owner.setdefault(name, leader) == leader:
                return  # the leader already accumulated this very tensor
        if self.owner.setdefault(name, name) != name:
            raise RuntimeError(
                f"{name} shared its input with {self.owner[name]} in an earlier batch but not now; "
                "the model's forward is not deterministic in structure, which quantplan cannot probe"
            )
        if name not in self.stats:
            self.stats[name] = InputStats.empty(x.shape[-1], x.device)
        stats = self.stats[name]
        if stats.channel_absmax.device != x.device:  # resumed from a saved state: read onto the CPU
            stats.move_to(x.device)
        if stats.sample is None:  # the sample comes from the first batch that shows this input
            self._sampling[name] = self.batches_done
        stats.update(x.detach(), self.sample_rows, self._stride if self._sampling.get(name) == self.batches_done else None)
        self._seen[key] = (weakref.ref(x), name)

    # -- partial results: flushed on interruption, read back by --resume -------------------

    def save(self, folder: Path, meta: dict, extra: dict | None = None) -> None:
        """Write accumulated state (safetensors) and metadata (json), atomically per file.

        Only between batches: inside one the totals hold part of it, which a resume would count twice."""
        if self.in_batch:
            raise RuntimeError("the probe's statistics hold part of a running batch: save between batches "
                               "(after commit_batch), so a resume never counts a batch twice")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = dict(extra or {})
        counts = {}
        for owner, s in self.stats.items():
            if s.tokens == 0 and s.nonfinite_tokens == 0:
                continue
            tensors[f"{owner}::gram"] = s.gram.data.cpu().contiguous()
            tensors[f"{owner}::absmax"] = s.channel_absmax.cpu().contiguous()
            if s.sample is not None:
                tensors[f"{owner}::sample"] = s.sample.contiguous()
            counts[owner] = [s.tokens, s.nonfinite_tokens]
        # the tensors go to a file named after the batch count and state.json, replaced last, names
        # it: a process killed between the two writes (SIGKILL) leaves the previous pair intact
        tensor_file = f"state-{self.batches_done:06d}.safetensors"
        state = {**meta, "batches_done": self.batches_done, "owner": self.owner, "counts": counts,
                 "tensors": tensor_file}
        with staged_file(folder / tensor_file) as tmp:
            save_file(tensors, str(tmp))
        atomic_write_text(folder / "state.json", json.dumps(state, indent=1))
        for old in folder.glob("state-*.safetensors"):
            if old.name != tensor_file:
                old.unlink()

    def load(self, folder: Path) -> tuple[dict, dict]:
        """Restore state written by :meth:`save`; returns its metadata and all saved tensors."""
        state = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / state.get("tensors", "state.safetensors")))
        self.owner = dict(state["owner"])
        self.batches_done = int(state["batches_done"])
        self.stats = {}
        for owner, counts in state["counts"].items():
            try:
                tokens, nonfinite = counts[:2]
                absmax, gram = tensors[f"{owner}::absmax"], tensors[f"{owner}::gram"]
            except (KeyError, ValueError) as error:
                raise ValueError(damaged(f"the statistics of {owner} are incomplete ({error!r})")) from error
            self.stats[owner] = InputStats(_saved_gram(gram, len(absmax)), absmax, tensors.get(f"{owner}::sample"),
                                           tokens, nonfinite)
        return state, tensors


def _saved_gram(tensor: torch.Tensor, width: int) -> UpperGram:
    """A saved Gram matrix: the flat upper blocks, or a ``[width, width]`` matrix (states written before the
    blocks were stored apart: full, or filled on and above the diagonal blocks only; the same upper blocks)."""
    return UpperGram.from_matrix(tensor, width) if tensor.dim() == 2 else UpperGram(tensor, width)


def partial_state_bytes(infos, sample_rows: int = 256, fisher: bool = False) -> int:
    """Bytes one flush of partial statistics writes for the candidate Linears ``infos`` (an upper bound).

    Per input a float32 Gram matrix (its upper blocks, :func:`analysis.gram.upper_elements`), channel max |x|
    (d_in) and ``sample_rows`` input rows (the probe's sample, at most one batch's tokens); with ``fisher`` each
    Linear's squared output gradients (d_out). Linears fed one tensor share one Gram matrix, but which do is
    only seen once a batch has run: each is counted here, so for a Llama block (q/k/v and gate/up sharing) the
    file is ~25-30% smaller than this.
    """
    floats = sum(upper_elements(i.in_features) + i.in_features * (1 + sample_rows)
                 + (i.out_features if fisher else 0) for i in infos)
    return 4 * floats

