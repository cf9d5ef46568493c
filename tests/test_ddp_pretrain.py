"""`selfsup pretrain` on 2 CPU processes (Lightning DDP, gloo) equals one process on the same global batch.

The two runs are made comparable sample for sample: rotation (its loss draws nothing: all four
rotations of every image), no augmentation (``--crop-scale 1.0 --no-flip``), a norm without batch
statistics (``--norm group``), and a per-device batch of half the global one. The train sampler
(:class:`~selfsup.data.sampler.ResumableSampler`, ``DistributedSampler``'s split) gives rank ``r``
the indices ``perm[r::2]`` of the epoch's permutation, which depends on the seed and epoch only, so at
step ``k`` the two ranks' batches are ``perm[kB + 2j + r]``, ``j < B/2``: together exactly the single
process's batch ``perm[kB:(k+1)B]``. The loss is a mean over the batch, so DDP's gradient average is the
single-process gradient, and the weights after every step are equal up to float32 summation order.
"""

import json

import pytest
import pytorch_lightning as pl
import torch

from selfsup.ssl.module import load_encoder
from selfsup.train import build_method
from tests.conftest import run_cli

pytestmark = pytest.mark.slow
GLOBAL_BATCH, STEPS = 16, 3
COMMON = ("pretrain", "--method", "rotation", "--backbone", "convnet_small", "--norm", "group", "--data", "digits",
          "--image-size", "8", "--crop-scale", "1.0", "--no-flip", "--no-online-probe", "--max-steps", str(STEPS),
          "--seed", "0", "--lr", "0.5", "--warmup-epochs", "0")  # 3 steps of cosine (warm-up would take half of them)


def test_ddp_pretraining_then_probing_gives_the_single_process_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one BLAS thread in both runs (as Lightning gives each rank on 2 cores)
    runs = {}
    for name, extra in (("one", ("--batch-size", str(GLOBAL_BATCH))),
                        ("ddp", ("--batch-size", str(GLOBAL_BATCH // 2), "--devices", "2", "--strategy", "ddp",
                                 "--accelerator", "cpu"))):
        r = run_cli(*COMMON, *extra, "--output", str(tmp_path), "--name", name, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = tmp_path / name
    # the exported encoder and the last checkpoint's: the same weights. float32: the runs sum the same per-image
    # gradients in another order (one conv over 16 images vs two over 8, then gloo's sum), ~1e-7 relative
    # per step; 3 steps stay far inside rtol 1e-4
    for where in ("export", "checkpoints/last.ckpt"):
        one, ddp = (load_encoder(runs[name] / where).state_dict() for name in ("one", "ddp"))
        assert one.keys() == ddp.keys() and one
        for k in one:
            torch.testing.assert_close(ddp[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{where}: {k}")
    # the steps really trained: equal weights are not just the shared seeded initialisation
    pl.seed_everything(0, verbose=False)
    init = build_method("rotation", {"backbone": "convnet_small", "norm": "group"}).encoder().state_dict()
    assert init.keys() == one.keys()
    assert max((one[k] - init[k]).abs().max() for k in one) > 1e-2
    top1 = {}
    for name, d in runs.items():
        r = run_cli("probe", str(d), "--device", "cpu", "--no-baselines", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        (row,) = json.loads((d / "eval" / "probe.json").read_text())["results"].values()
        top1[name] = row
    for key in ("top1", "top5", "weight_decay"):
        assert top1["ddp"][key] == top1["one"][key], key
