"""notebooks/walkthrough.ipynb runs top to bottom (nbclient) on a tiny model."""

from __future__ import annotations

import os

import pytest
from fixtures import REPO
from tiny import save_tiny_english

NOTEBOOK = REPO / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    model = save_tiny_english(tmp_path / "model")
    out = tmp_path / "out"
    # The kernel inherits this environment: a tiny model, small data, outputs under tmp_path.
    monkeypatch.setenv("QUANTPLAN_WALKTHROUGH_MODEL", str(model))
    monkeypatch.setenv("QUANTPLAN_WALKTHROUGH_OUT", str(out))
    monkeypatch.setenv("QUANTPLAN_WALKTHROUGH_QUICK", "1")
    # ...and imports this checkout's quantplan, not whichever one is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parents[1]),
                                                                   os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # layer errors, weight heat map, input outliers, pareto
    for name in ("sensitivity.parquet", "plan10.json", "plan33.json", "checkpoint/config.json",
                 "compare/scoreboard.csv", "compare/report.html", "compare/report.md"):
        assert (out / name).is_file(), name
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "dynamic +10%" in text and "dynamic +33%" in text and "Spearman" in text


def test_committed_walkthrough_has_no_errors():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    sources = "\n".join(c.source for c in notebook.cells)
    for step in ("analyze(", "plot_layer_errors", "spike_table", "plan(table", "export(", "compare("):
        assert step in sources, step
    assert not [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if o.get("output_type") == "error"]
