"""Per-block checkpoints of a streaming analysis: finished rows plus the activations carried on.

Layout of ``<folder>`` (``<out>/partial/`` when the analysis has an output folder, else a
temporary folder):

- ``state.json``: the run's identity (model, calibration, formats, ...) and ``steps_done``;
  rewriting it is the commit point of a step (one stage run forward, or backward for Fisher).
- ``rows-NNNN.json``: the table rows of finished step NNNN.
- ``hidden-NNNN/BBBBB.safetensors``: the input of stage NNNN for calibration batch BBBBB, with
  the decoder layer's keyword arguments (position embeddings, mask, ...) beside it.
- ``grad-NNNN/BBBBB.safetensors``: the gradient of the next-token loss with respect to that
  input (Fisher scores' reverse pass), written by stage NNNN's backward step for stage NNNN-1's
  (without ``hidden`` where the loss never reached that input).

Carried activations always live on disk, one file per batch: a step reads a batch, runs it
and writes its output before the next batch is read, so memory holds one batch however many
calibration tokens there are, and the files double as the resume point. Every file is
written to a temporary name and moved into place with ``os.replace``; a step's output folder
is renamed into place as a whole before ``state.json`` says the step is done, and the folders
it consumed are deleted only after that, so a process killed at any instant (SIGKILL
included) leaves a consistent checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantplan.common.files import atomic_write_text, staged_file

from .fisher_windows import RESUME_HINT, saved_backward_batches
from .stream_weights import StreamingUnsupported
from .table import TableMismatch


class StreamCheckpoint:
    """Reads and writes one streaming run's checkpoint folder."""

    def __init__(self, folder: Path, run_meta: dict, total_batches: int = 0):
        self.folder = Path(folder)
        self.run_meta = run_meta
        self.total_batches = total_batches  # the calibration set's: for a state saved before its backward batches

    def start(self, resume: bool) -> tuple[int, dict[int, list[dict]]]:
        """(steps done, rows of finished steps): a fresh folder, or the saved state with ``resume``."""
        state_file = self.folder / "state.json"
        if not resume:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)
            return 0, {}
        if not state_file.is_file():
            raise FileNotFoundError(
                f"--resume found no partial results in {self.folder}: run without --resume to start afresh")
        state = json.loads(state_file.read_text())
        state["fisher_batches"] = saved_backward_batches(state, self.total_batches)
        for key, value in self.run_meta.items():
            if state.get(key) != value:
                hint = RESUME_HINT if key == "fisher_batches" else ""
                raise TableMismatch(
                    f"the partial results in {self.folder} were made with another {key.replace('_', ' ')}: "
                    f"run with the same arguments as before{hint}, or without --resume to start afresh")
        done = int(state["steps_done"])
        rows = {s: json.loads((self.folder / f"rows-{s:04d}.json").read_text()) for s in range(done)}
        print(f"quantplan: resuming the streaming analysis after {done} steps")
        return done, rows

    def hidden(self, stage: int) -> Path:
        """Folder of the inputs of ``stage`` (one file per batch)."""
        return self.folder / f"hidden-{stage:04d}"

    def grad(self, stage: int) -> Path:
        """Folder of the loss gradients with respect to the inputs of ``stage``."""
        return self.folder / f"grad-{stage:04d}"

    def output_folder(self, target: Path | None) -> Path | None:
        """An empty temporary folder to fill with what becomes ``target`` at :meth:`commit`."""
        if target is None:
            return None
        tmp = target.with_name(f".{target.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def commit(self, step: int, rows: list[dict], outputs: Path | None, target: Path | None,
               consumed: tuple[Path, ...] = ()) -> None:
        """Step ``step`` finished: save its rows, move its outputs to ``target``, mark it done, then drop
        the ``consumed`` folders no later step reads."""
        atomic_write_text(self.folder / f"rows-{step:04d}.json", json.dumps(rows, default=_plain))
        if outputs is not None:
            if target.exists():  # left by a run killed between this rename and the state update
                shutil.rmtree(target)
            os.replace(outputs, target)
        state = {**self.run_meta, "steps_done": step + 1}
        atomic_write_text(self.folder / "state.json", json.dumps(state, indent=1))
        for folder in consumed:
            if folder.exists():
                shutil.rmtree(folder)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def write_batch(folder: Path, index: int, hidden: torch.Tensor | None, kwargs: dict) -> None:
    """Save one batch's activations and layer keyword arguments as ``folder/BBBBB.safetensors``.

    ``hidden`` None: a gradient the loss never reached (a LLaVA tower's blocks after the deepest one its
    projector reads), stored as absent so the stage below backpropagates none, as autograd does in memory.
    """
    tensors = {} if hidden is None else {"hidden": hidden.detach().contiguous()}
    spec = {}
    for key, value in kwargs.items():
        if torch.is_tensor(value):
            tensors[f"kw::{key}"] = value.detach().contiguous().clone()
            spec[key] = ["tensor"]
        elif isinstance(value, tuple | list) and value and all(torch.is_tensor(v) for v in value):
            for i, v in enumerate(value):
                tensors[f"kw::{key}::{i}"] = v.detach().contiguous().clone()
            spec[key] = ["tensors", len(value)]
        elif value is None or isinstance(value, bool | int | float | str):
            spec[key] = ["value", value]
        elif isinstance(value, tuple | list) and all(isinstance(v, bool | int | float | str) for v in value):
            spec[key] = ["values", type(value).__name__, list(value)]  # LLaVA's output_hidden_states=[-2, -3]
        else:
            raise StreamingUnsupported(
                f"the decoder layers take {key}={type(value).__name__}, which streaming analysis cannot carry "
                f"from block to block: run without --max-memory")
    with staged_file(folder / f"{index:05d}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"kwargs": json.dumps(spec)})


def read_batch(folder: Path, index: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor | None, dict]:
    """Inverse of :func:`write_batch`, the tensors loaded onto ``device``."""
    from safetensors import safe_open

    path = folder / f"{index:05d}.safetensors"
    with safe_open(path, "pt") as f:
        spec = json.loads(f.metadata()["kwargs"])
    tensors = load_file(str(path), device=str(device))
    kwargs = {}
    for key, (kind, *rest) in spec.items():
        if kind == "tensor":
            kwargs[key] = tensors[f"kw::{key}"]
        elif kind == "tensors":
            kwargs[key] = tuple(tensors[f"kw::{key}::{i}"] for i in range(rest[0]))
        elif kind == "values":
            kwargs[key] = tuple(rest[1]) if rest[0] == "tuple" else list(rest[1])
        else:
            kwargs[key] = rest[0]
    return tensors.get("hidden"), kwargs


def _plain(value):
    """JSON for the numpy/torch scalars a row may hold."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} into a checkpoint row")
