"""Comparison: what ``compare`` measured, saved as csv/Markdown/json files in one folder.

Files: ``scoreboard.csv`` (columns documented in :data:`reports.scoreboard.COLUMNS`),
``scoreboard.md`` (llama.cpp-style table plus the verdicts), ``generations.csv`` (prompt x
variant, long form) and ``generations.md`` (one column per variant), ``agreement.csv``
(predicted vs measured per module) and ``comparison.json`` (metadata, column docs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from quantplan.common.files import atomic_write_text, staged_file

from .agreement import AGREEMENT_COLUMNS
from .scoreboard import COLUMNS, to_markdown, verdicts
from .tables import markdown_table

FILES = ("scoreboard.csv", "scoreboard.md", "generations.csv", "generations.md", "agreement.csv", "comparison.json")


@dataclass
class Comparison:
    """The scoreboard, side-by-side generations, predicted-vs-measured rows and metadata."""

    scoreboard: pd.DataFrame
    generations: dict[str, dict[str, str]]  # variant -> {prompt: text}
    agreement: pd.DataFrame
    meta: dict = field(default_factory=dict)

    @property
    def verdicts(self) -> list[str]:
        """Per dynamic plan: whether it beats the heuristic baselines at equal bytes."""
        return verdicts(self.scoreboard)

    def generations_frame(self) -> pd.DataFrame:
        """Prompts as rows, one column per variant."""
        prompts = list(dict.fromkeys(p for answers in self.generations.values() for p in answers))
        frame = pd.DataFrame({"prompt": prompts})
        for variant, answers in self.generations.items():
            frame[variant] = [answers.get(p, "") for p in prompts]
        return frame

    def scoreboard_markdown(self) -> str:
        """The scoreboard table followed by the verdict lines."""
        lines = [to_markdown(self.scoreboard), ""]
        lines += [f"- {v}" for v in self.verdicts]
        return "\n".join(lines).rstrip() + "\n"

    def save(self, folder: str | Path) -> Path:
        """Write the files listed in :data:`FILES` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        long = [{"variant": v, "prompt": p, "text": t} for v, answers in self.generations.items() for p, t in answers.items()]
        frames = {"scoreboard.csv": self.scoreboard, "agreement.csv": self.agreement,
                  "generations.csv": pd.DataFrame(long, columns=["variant", "prompt", "text"])}
        for name, frame in frames.items():
            with staged_file(folder / name) as tmp:
                frame.to_csv(tmp, index=False)
        atomic_write_text(folder / "scoreboard.md", self.scoreboard_markdown())
        atomic_write_text(folder / "generations.md", markdown_table(self.generations_frame()) + "\n")
        doc = {"meta": self.meta, "verdicts": self.verdicts, "scoreboard_columns": COLUMNS,
               "agreement_columns": AGREEMENT_COLUMNS}
        atomic_write_text(folder / "comparison.json", json.dumps(doc, indent=1, default=str))
        return folder / "scoreboard.csv"

    @classmethod
    def load(cls, folder: str | Path) -> Comparison:
        """Read a comparison written by :meth:`save`."""
        folder = Path(folder)
        if not (folder / "scoreboard.csv").is_file():
            raise FileNotFoundError(f"no scoreboard.csv in {folder}: run `quantplan compare --out {folder}` first")
        board = pd.read_csv(folder / "scoreboard.csv", keep_default_na=False, na_values=[""])
        for column in ("variant", "kind", "plan", "measured_with", "note"):
            board[column] = board[column].fillna("").astype(str)
        generations: dict[str, dict[str, str]] = {}
        long = pd.read_csv(folder / "generations.csv", keep_default_na=False)
        for row in long.itertuples(index=False):
            generations.setdefault(row.variant, {})[row.prompt] = row.text
        agreement = pd.read_csv(folder / "agreement.csv")
        meta = json.loads((folder / "comparison.json").read_text())["meta"]
        return cls(board, generations, agreement, meta)
