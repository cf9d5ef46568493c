"""Every registered method: one training step on 2 gloo ranks equals one process on the whole batch.

Each rank computes the method's own ``loss`` on its half of a fixed global batch, and the gradients are
averaged over ranks as DDP does; the result must equal the single-process gradient of the loss on the
whole batch. The model is in eval mode, so augmentation randomness and per-rank batch statistics are
out of the picture and what is checked is the loss's own cross-rank scaling (losses that gather
negatives from every rank must scale by the world size correctly).

A loss that draws its own randomness even in eval mode (jigsaw's permutations, relative position's
neighbours, a VAE's or flow's noise, a GAN's z) draws differently for a half batch than for the whole
batch, so no two-rank run can reproduce it sample for sample; such methods are detected (two seeds give
two gradients) and skipped with that reason.
"""

import pytest
import torch
import torch.distributed as dist

import selfsup
from selfsup.train import method_arguments
from tests.conftest import fixed_batch

pytestmark = pytest.mark.slow
SIZE, BATCH = 16, 8
DISTRIBUTED_KWARGS = {"cpc": {"gather_negatives": True}}  # what a method needs to see the global batch


def _model(method: str):
    torch.manual_seed(0)
    kw = {"backbone": "convnet_small", **DISTRIBUTED_KWARGS.get(method, {})}
    if "image_size" in method_arguments(method):
        kw["image_size"] = SIZE
    return selfsup.METHODS[method](**kw).eval()


def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model.loss(batch)["loss"].backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, init: str, out_dir: str, method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    images, labels = fixed_batch(BATCH, SIZE)
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    grads = _grads(_model(method), (images[local], labels[local]))
    for g in grads.values():
        dist.all_reduce(g)  # sum, then / world below: DDP's average
        g /= world
    if rank == 0:
        torch.save(grads, f"{out_dir}/grads.pt")
    dist.destroy_process_group()


def _stochastic(method: str) -> bool:
    batch = fixed_batch(BATCH, SIZE)
    grads = []
    for seed in (1, 2):
        model = _model(method)
        torch.manual_seed(seed)  # after the seeded build: only the loss's own draws differ
        grads.append(_grads(model, batch))
    return any(not torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


@pytest.mark.parametrize("method", sorted(selfsup.METHODS))
def test_two_ranks_give_the_single_process_gradient(method, tmp_path):
    import torch.multiprocessing as mp

    if _stochastic(method):
        pytest.skip(f"{method}'s loss draws its own randomness in eval mode: a half batch cannot replay it")
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/pg", str(tmp_path), method), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "grads.pt")
    single = _grads(_model(method), fixed_batch(BATCH, SIZE))
    assert ddp.keys() == single.keys() and single
    for name, g in single.items():
        torch.testing.assert_close(ddp[name], g, rtol=1e-4, atol=1e-6, msg=f"{method}: {name}")
