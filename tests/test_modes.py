"""quantplan/common/modes.py: folders written via a staging folder get the umask's modes, not 0700/0600."""

from __future__ import annotations

import os
import stat

from quantplan.common.modes import apply_umask, current_umask, staging_dir


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_staged_tree_gets_the_umask_modes(tmp_path):
    old = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        staged = staging_dir(tmp_path, prefix=".tmp-")
        assert _mode(staged) == 0o755  # mkdtemp alone gives 0700
        (staged / "sub").mkdir(mode=0o700)
        weights = staged / "sub" / "model.safetensors"
        weights.write_bytes(b"x")
        weights.chmod(0o600)  # what save_pretrained leaves
        script = staged / "run.sh"
        script.write_text("#!/bin/sh\n")
        script.chmod(0o700)
        apply_umask(staged)
        assert (_mode(staged), _mode(staged / "sub"), _mode(weights), _mode(script)) == (0o755, 0o755, 0o644, 0o744)
        os.umask(0o077)  # a private umask stays private
        apply_umask(staged)
        assert (_mode(staged), _mode(weights)) == (0o700, 0o600)
    finally:
        os.umask(old)
