"""Per-block checkpoints of a streaming analysis: finished rows plus the activations carried on.

Layout of ``<folder>`` (``<out>/partial/`` when the analysis has an output folder, else a
temporary folder):

- ``state.json``: the run's identity (model, calibration, formats, ...) and ``stages_done``;
  rewriting it is the commit point of a stage.
- ``rows-NNNN.json``: the table rows of finished stage NNNN.
- ``hidden-NNNN/BBBBB.safetensors``: the input of stage NNNN for calibration batch BBBBB, with
  the decoder layer's keyword arguments (position embeddings, mask, ...) beside it.

Carried activations always live on disk, one file per batch: a stage reads a batch, runs it
and writes its output before the next batch is read, so memory holds one batch however many
calibration tokens there are, and the files double as the resume point. Every file is
written to a temporary name and moved into place with ``os.replace``; a stage's output folder
is renamed into place as a whole before ``state.json`` says the stage is done, so a process
killed at any instant (SIGKILL included) leaves a consistent checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantplan.common.files import atomic_write_text, staged_file

from .stream_weights import StreamingUnsupported
from .table import TableMismatch


class StreamCheckpoint:
    """Reads and writes one streaming run's checkpoint folder."""

    def __init__(self, folder: Path, run_meta: dict):
        self.folder = Path(folder)
        self.run_meta = run_meta

    def start(self, resume: bool) -> tuple[int, dict[int, list[dict]]]:
        """(stages done, rows of finished stages): a fresh folder, or the saved state with ``resume``."""
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
        for key, value in self.run_meta.items():
            if state.get(key) != value:
                raise TableMismatch(
                    f"the partial results in {self.folder} were made with another {key.replace('_', ' ')}: "
                    f"run with the same arguments as before, or without --resume to start afresh")
        done = int(state["stages_done"])
        rows = {s: json.loads((self.folder / f"rows-{s:04d}.json").read_text()) for s in range(done)}
        print(f"quantplan: resuming the streaming analysis after {done} stages")
        return done, rows

    def hidden(self, stage: int) -> Path:
        return self.folder / f"hidden-{stage:04d}"

    def output_folder(self, stage: int) -> Path:
        """An empty temporary folder for the outputs of ``stage`` (the input of ``stage + 1``)."""
        tmp = self.folder / f".hidden-{stage + 1:04d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def commit(self, stage: int, rows: list[dict], outputs: Path | None) -> None:
        """Stage ``stage`` finished: save its rows and outputs, then mark it done, then drop its input."""
        atomic_write_text(self.folder / f"rows-{stage:04d}.json", json.dumps(rows, default=_plain))
        if outputs is not None:
            target = self.hidden(stage + 1)
            if target.exists():  # left by a run killed between this rename and the state update
                shutil.rmtree(target)
            os.replace(outputs, target)
        state = {**self.run_meta, "stages_done": stage + 1}
        atomic_write_text(self.folder / "state.json", json.dumps(state, indent=1))
        if self.hidden(stage).exists():
            shutil.rmtree(self.hidden(stage))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def write_batch(folder: Path, index: int, hidden: torch.Tensor, kwargs: dict) -> None:
    """Save one batch's activations and layer keyword arguments as ``folder/BBBBB.safetensors``."""
    tensors = {"hidden": hidden.detach().contiguous()}
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
        else:
            raise StreamingUnsupported(
                f"the decoder layers take {key}={type(value).__name__}, which streaming analysis cannot carry "
                f"from block to block: run without --max-memory")
    with staged_file(folder / f"{index:05d}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"kwargs": json.dumps(spec)})


def read_batch(folder: Path, index: int) -> tuple[torch.Tensor, dict]:
    """Inverse of :func:`write_batch`."""
    from safetensors import safe_open

    path = folder / f"{index:05d}.safetensors"
    with safe_open(path, "pt") as f:
        spec = json.loads(f.metadata()["kwargs"])
    tensors = load_file(str(path))
    kwargs = {}
    for key, (kind, *rest) in spec.items():
        if kind == "tensor":
            kwargs[key] = tensors[f"kw::{key}"]
        elif kind == "tensors":
            kwargs[key] = tuple(tensors[f"kw::{key}::{i}"] for i in range(rest[0]))
        else:
            kwargs[key] = rest[0]
    return tensors["hidden"], kwargs


def _plain(value):
    """JSON for the numpy/torch scalars a row may hold."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} into a checkpoint row")
