"""make install: torch from TORCH_INDEX when set, pip's own configuration otherwise, as the README says."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _install_commands(*variables: str) -> list[str]:
    out = subprocess.run(["make", "-n", "install", *variables], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_torch_index_is_used_only_when_set():
    default = [line for line in _install_commands() if "torch==" in line]
    assert len(default) == 1 and "--index-url" not in default[0]
    cpu = "https://download.pytorch.org/whl/cpu"
    chosen = [line for line in _install_commands(f"TORCH_INDEX={cpu}") if "torch==" in line]
    assert len(chosen) == 1 and chosen[0].endswith(f"--index-url {cpu}")
    assert all("--index-url" not in line for line in _install_commands(f"TORCH_INDEX={cpu}") if "torch==" not in line)


def test_readme_says_what_install_does():
    readme = (ROOT / "README.md").read_text()
    assert "make install TORCH_INDEX=https://download.pytorch.org/whl/cpu" in readme
    assert "puts the CPU build of torch" not in readme  # the default is pip's own choice, not always CPU
