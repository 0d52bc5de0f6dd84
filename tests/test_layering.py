"""The Flower-free layers stay free of Flower: the core, the local engine, codecs, models, data."""

from __future__ import annotations

import subprocess
import sys

FLOWER_FREE = (
    "flwr_splitms.core",
    "flwr_splitms.local",
    "flwr_splitms.codecs",
    "flwr_splitms.models",
    "flwr_splitms.data",
    "flwr_splitms.config",
    "flwr_splitms.checkpoint",
)


def test_flower_free_modules_do_not_import_flower() -> None:
    code = (
        f"import sys, {', '.join(FLOWER_FREE)}\n"
        "loaded = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
