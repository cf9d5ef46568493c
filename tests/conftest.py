import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Decoded-data caches go to a per-session temp dir, never the user's ~/.cache."""
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path_factory.getbasetemp() / "selfsup-cache"))


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed ``selfsup`` entry point as a user would, in a subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "selfsup", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
