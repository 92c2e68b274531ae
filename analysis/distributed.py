"""Several processes (torchrun / accelerate launch): shard the calibration batches, reduce the statistics.

Every process holds the whole model. Rank r runs calibration batches r, r+W, r+2W, ... (W
processes); before measuring, the probe statistics are reduced across processes: Gram sums,
token counts and Fisher gradient sums are added, channel max |x| takes the maximum, and the
sampled input rows come from rank 0, which ran the first batch, as a single process does.
Each process then measures every W-th module and rank 0 gathers the rows and writes the
table, so the result equals the single-process table up to the order of float32 additions.
Fisher targets are seeded by the global batch index, so they are the same batches' targets.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


def bind_local_gpu(device: str) -> None:
    """Under a launcher (torchrun, accelerate launch) with ``--device cuda`` (no index), make ``cuda`` this process's
    GPU, that of its ``LOCAL_RANK``: else every process would use GPU 0, which NCCL refuses. Called before anything
    touches CUDA (``--max-memory auto`` reads the free memory of ``cuda``), and again by
    :func:`init_from_environment`; an explicit index is the user's choice."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def init_from_environment(device: str = "cpu") -> None:
    """Join the process group a launcher (torchrun, accelerate launch) describes in the environment, each process on
    its own GPU (:func:`bind_local_gpu`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        bind_local_gpu(device)
        dist.init_process_group("gloo" if device == "cpu" else "nccl")


def is_main_process() -> bool:
    return Shard.current().rank == 0


@dataclass(frozen=True)
class Shard:
    """This process's place among the analysis processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Shard:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def calibration(self, calibration):
        """This process's share of the calibration batches (the set itself when alone)."""
        if self.world == 1:
            return calibration
        return ShardedCalibration(calibration, self.rank, self.world)

    def partial_folder(self, out_dir) -> Path | None:
        """Where this process flushes partial statistics: ``partial/`` alone, ``partial/rank-R-of-W`` else."""
        from .analyze import PARTIAL_DIR

        if out_dir is None:
            return None
        folder = Path(out_dir) / PARTIAL_DIR
        return folder if self.world == 1 else folder / f"rank-{self.rank}-of-{self.world}"

    def remove_partial(self, folder: Path | None) -> None:
        """Delete this process's partial statistics once the table is written."""
        if folder is not None and folder.exists():
            shutil.rmtree(folder)
        if self.world > 1:
            dist.barrier()
            if self.rank == 0 and folder is not None and folder.parent.exists() and not any(folder.parent.iterdir()):
                folder.parent.rmdir()

    def reduce(self, probe, grads, energy=None) -> None:
        """Combine every process's statistics so each holds the totals over all batches."""
        if self.world == 1:
            return
        owners = sorted(probe.stats)
        if dist.get_backend() == "nccl":  # statistics resumed onto the CPU, no batch run since: NCCL takes GPU tensors
            _to_gpu(probe, grads)
        everyone = [None] * self.world
        dist.all_gather_object(everyone, (owners, dict(probe.owner)))
        if any(other != everyone[0] for other in everyone):
            raise RuntimeError("the analysis processes saw different modules: every process must load the same "
                               "model and calibration set")
        for owner in owners:
            stats = probe.stats[owner]
            dist.all_reduce(stats.gram.data, op=dist.ReduceOp.SUM)  # the same block layout on every rank
            dist.all_reduce(stats.channel_absmax, op=dist.ReduceOp.MAX)
            counts = torch.tensor([stats.tokens, stats.nonfinite_tokens], dtype=torch.int64, device=stats.gram.data.device)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            stats.tokens, stats.nonfinite_tokens = int(counts[0]), int(counts[1])
        samples = [{owner: probe.stats[owner].sample for owner in owners}]
        dist.broadcast_object_list(samples, src=0)
        for owner in owners:
            probe.stats[owner].sample = samples[0][owner]
        if grads:
            _reduce_gradients(grads, probe.stats[owners[0]].gram.data.device if owners else torch.device("cpu"))
        if energy:
            _reduce_energies(energy, probe.stats[owners[0]].gram.data.device if owners else torch.device("cpu"))

    def agree(self, mine: dict | None) -> dict | None:
        """Rank 0's value of ``mine`` on every rank (``mine`` itself when alone): one decision for all processes,
        where each could round a near tie another way."""
        if self.world == 1:
            return mine
        chosen = [mine]
        dist.broadcast_object_list(chosen, src=0)
        return chosen[0]

    def mine(self, items: list) -> list[tuple[int, object]]:
        """(position, item) pairs this process measures: every W-th one."""
        return [(i, item) for i, item in enumerate(items) if i % self.world == self.rank]

    def gather(self, measured: dict[int, list[dict]]) -> list[list[dict]]:
        """Every process's measured rows, in item order (on every rank)."""
        if self.world == 1:
            return [measured[i] for i in sorted(measured)]
        everyone = [None] * self.world
        dist.all_gather_object(everyone, measured)
        merged = {i: rows for part in everyone for i, rows in part.items()}
        return [merged[i] for i in sorted(merged)]


def _to_gpu(probe, grads) -> None:
    """Move every statistic to this process's GPU in place (a no-op for those already there)."""
    device = torch.device("cuda", torch.cuda.current_device())
    for stats in probe.stats.values():
        stats.move_to(device)
    if grads:
        grads.sums = {name: s.to(device) for name, s in grads.sums.items()}


def _reduce_gradients(grads, device) -> None:
    """Sum the squared gradients and their token counts. A process that ran no backward batch (the Fisher pass
    backpropagates the first batches only, ``analyze(fisher_samples=...)``, and they are dealt out in turn) adds
    zeros for each module the others hold."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, ({n: s.numel() for n, s in grads.sums.items()}, sorted(grads.ran)))
    widths = {name: width for held, _ in everyone for name, width in held.items()}
    grads.ran = {name for _, ran in everyone for name in ran}
    for name, width in widths.items():
        if name not in grads.sums:
            grads.sums[name] = torch.zeros(width, dtype=torch.float32, device=device)
    for name in sorted(grads.sums):
        dist.all_reduce(grads.sums[name], op=dist.ReduceOp.SUM)
        count = torch.tensor([grads.tokens.get(name, 0)], dtype=torch.int64, device=grads.sums[name].device)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        grads.tokens[name] = int(count[0])


def _reduce_energies(energy, device) -> None:
    """Sum the output energies and their token counts (a module one process never ran counts 0 there)."""
    names = sorted(energy.names)
    sums = torch.tensor([energy.sums.get(n, 0.0) for n in names], dtype=torch.float64, device=device)
    tokens = torch.tensor([energy.tokens.get(n, 0) for n in names], dtype=torch.int64, device=device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
    sums, tokens = sums.tolist(), tokens.tolist()
    energy.sums = {n: s for n, s, t in zip(names, sums, tokens, strict=True) if t > 0}
    energy.tokens = {n: t for n, t in zip(names, tokens, strict=True) if t > 0}


class ShardedCalibration:
    """Batches r, r+W, r+2W, ... of a calibration set; its identity (``meta``) stays the whole set's."""

    def __init__(self, calibration, rank: int, world: int):
        self.inner, self.rank, self.world = calibration, rank, world

    @property
    def meta(self) -> dict:
        return self.inner.meta

    def num_batches(self, batch_size: int) -> int:
        total = self.inner.num_batches(batch_size)
        if total < self.world:
            raise ValueError(f"{total} calibration batches cannot be shared by {self.world} processes: pass more "
                             f"--samples, a smaller --batch-size, or fewer processes")
        return len(range(self.rank, total, self.world))

    def numbered_batches(self, batch_size: int):
        """(global batch index, batch) for this process's batches."""
        self.num_batches(batch_size)
        for index, batch in enumerate(self.inner.batches(batch_size)):
            if index % self.world == self.rank:
                yield index, batch

    def batches(self, batch_size: int):
        for _, batch in self.numbered_batches(batch_size):
            yield batch
