import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TAR = next((p / "shared" / "data" / "cifar10-jpeg.tar.gz" for p in (ROOT.parent, ROOT.parent.parent)
                  if (p / "shared" / "data" / "cifar10-jpeg.tar.gz").is_file()),
                 ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")  # beside the clone, or a worktree's parent

# 2 cores: one test at a time uses both; under pytest-xdist (-n 2, as .ci/run runs the slow suite) each worker one
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


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


def run_cli_here(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``run_cli`` in this process: the same ``selfsup.cli.main``, its exit status and printed lines, without
    starting an interpreter and importing torch again (about 7 s a call on 2 cores). For commands that stop
    at a bad input or only read results; what needs a real process (signals, DDP) uses :func:`run_cli`."""
    from selfsup import cli

    out, err = io.StringIO(), io.StringIO()
    here, argv = os.getcwd(), sys.argv[:]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(list(args))
            except SystemExit as e:  # argparse's own errors and --help
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
        sys.argv = argv
    return subprocess.CompletedProcess(["selfsup", *args], rc, out.getvalue(), err.getvalue())


def fixed_batch(n: int = 16, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch as the datamodule yields it: uint8 images (n, 3, size, size), labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return images, torch.zeros(n, dtype=torch.long)


def loss_before_and_after_one_step(model, batch) -> tuple[float, float]:
    """The method's loss on ``batch``, then again after one optimiser step on that same batch.

    The model's random augmentations must be off, so that both losses see the same inputs.
    """
    opt = model.build_optimizer(model.parameters())
    model.train()
    before = model.loss(batch)["loss"]
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = model.loss(batch)["loss"]
    return before.item(), after.item()


def perturb_(model, scale: float = 0.01) -> None:
    """Move every weight away from its seeded initialisation, so a reload cannot match by accident."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
