"""Every registered method: one training step on 2 gloo ranks equals one process on the whole batch.

Each rank computes the method's own ``loss`` on its half of a fixed global batch, and the gradients are
averaged over ranks as DDP does; the result must equal the single-process gradient of the loss on the
whole batch. The model is in eval mode, so augmentation randomness and per-rank batch statistics are
out of the picture and what is checked is the loss's own cross-rank scaling (losses that gather
negatives from every rank must scale by the world size correctly). ``flow+train`` runs in training mode:
ActNorm's first-batch initialisation (statistics averaged over ranks) and the flips are covered too.

Some losses draw their own randomness even in eval mode (jigsaw's permutation labels, relative
position's neighbour labels, a VAE's ``eps``, a flow's dequantisation noise, a GAN's ``z``). A half
batch draws differently from the whole batch, so the single-process run *records* every draw its loss
makes (:class:`Draws` wraps the torch samplers the methods use) and each rank *replays* the recorded
draws sliced to its share of the batch: a draw with a dimension of size ``B * m`` (the first such
dimension; ``B`` the global batch) is sliced to ``[r * B / W * m, (r + 1) * B / W * m)`` along it, a draw
without one is replayed whole. A rank's draw whose shape, dtype or order does not match the recording,
a recorded draw left unused, or any draw that reached torch's generator without being replayed, fails
the test: no draw is attributed by guess.

No method is skipped: in eval mode none has a term that couples the images of a batch other than
CPC's and Exemplar's negatives (gathered with ``gather_negatives``; ``cpc+local_negatives`` and
``exemplar+local_negatives`` are the expected failures that show the comparison sees a missing gather; multitask's cpc task gathers, ``multitask+cpc_layer_norm``). The GAN losses are means of per-image terms over the
reals and over the fakes, so for them the check is that every ``z`` is replayed, not which rank gets
which (a swap of the ranks' ``z`` halves gives the same averaged gradient). All methods run in one
spawn of 2 processes, to keep the cost of starting them once.
"""

import pytest
import torch
import torch.distributed as dist

import selfsup
from selfsup.train import method_arguments
from tests.conftest import fixed_batch

pytestmark = pytest.mark.slow
SIZE, BATCH = 16, 6  # 6: no other dimension of the methods' draws (latent sizes, 9 tiles, 2 coords) is a multiple
DISTRIBUTED_KWARGS = {"cpc": {"gather_negatives": True}, "exemplar": {"gather_negatives": True}}  # what a method needs to see the global batch
# cases beyond one per method: "<method>+<label>" -> its options
VARIANTS = {"multitask+all_tasks": {"tasks": "rotation,relative_position,jigsaw,colorization,cpc"},
            "cpc+local_negatives": {"gather_negatives": False}, "flow+train": {},
            "exemplar+local_negatives": {"gather_negatives": False},
            "multitask+cpc_layer_norm": {"tasks": "cpc", "norm": "layer"}}
# in training mode: flow's ActNorm initialises from the first batch (its statistics averaged over ranks) and
# its random flips are replayed like any draw
TRAIN_MODE = {"flow+train"}
# must differ: shows the comparison sees a loss that does not gather what the single process sees
UNEQUAL = {"cpc+local_negatives": "without gather_negatives each rank's InfoNCE has only its own half batch's "
                                  "targets as candidates, the single process has the whole batch's",
           "exemplar+local_negatives": "without gather_negatives each rank's triplets take negatives from its own "
                                       "half batch only, the single process from the whole batch"}

SAMPLERS = ("rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal",
            "bernoulli", "multinomial", "poisson")  # torch.<name>
IN_PLACE = ("uniform_", "normal_", "bernoulli_", "random_", "exponential_", "geometric_", "cauchy_",
            "log_normal_")  # torch.Tensor.<name>


class Draws:
    """Record the random tensors a loss draws, or replay them sliced to one rank's share of the batch."""

    def __init__(self, batch: int, records: list[tuple[str, torch.Tensor]] | None = None) -> None:
        self.batch, self.records = batch, [] if records is None else records
        self._next, self._share = 0, None

    def _expected(self, name: str, shape: torch.Size) -> torch.Tensor:
        if self._next >= len(self.records):
            raise AssertionError(f"the rank drew more than the recorded {len(self.records)} draws: {name}{tuple(shape)}")
        rec_name, rec = self.records[self._next]
        self._next += 1
        rank, world = self._share
        dims = [d for d, n in enumerate(rec.shape) if n and n % self.batch == 0]
        if dims:  # the batch dimension: rows of B * m, m per image
            d, m = dims[0], rec.shape[dims[0]] // self.batch
            share = self.batch // world * m
            rec = rec.narrow(d, rank * share, share)
        if rec_name != name or rec.shape != shape:
            raise AssertionError(
                f"draw {self._next - 1} cannot be attributed: recorded {rec_name}, expected on rank {rank} "
                f"{tuple(rec.shape)}, the rank drew {name}{tuple(shape)}"
            )
        return rec

    def _sampler(self, name: str, fn):
        def wrapped(*args, **kwargs):
            if self._share is None:  # record
                out = fn(*args, **kwargs)
                self.records.append((name, out.detach().clone()))
                return out
            with torch.random.fork_rng(devices=[]):  # the shape and dtype the rank asks for, without consuming
                like = fn(*args, **kwargs)
            rec = self._expected(name, like.shape)
            if rec.dtype != like.dtype:
                raise AssertionError(f"{name}: recorded {rec.dtype}, the rank drew {like.dtype}")
            return rec.to(like.device).clone()

        return wrapped

    def _in_place(self, name: str, fn):
        def wrapped(tensor, *args, **kwargs):
            if self._share is None:
                fn(tensor, *args, **kwargs)
                self.records.append((name, tensor.detach().clone()))
                return tensor
            with torch.no_grad():
                return tensor.copy_(self._expected(name, tensor.shape))

        return wrapped

    def patch(self, mp: pytest.MonkeyPatch, share: tuple[int, int] | None = None) -> None:
        """Record (``share=None``) or replay ``share = (rank, world)`` from now until ``mp`` is undone."""
        self._share = share
        for name in SAMPLERS:
            mp.setattr(torch, name, self._sampler(name, getattr(torch, name)))
        for name in IN_PLACE:
            mp.setattr(torch.Tensor, name, self._in_place(name, getattr(torch.Tensor, name)))

    def check_used(self) -> None:
        assert self._next == len(self.records), f"{len(self.records) - self._next} recorded draws were not replayed"


def _model(case: str):
    torch.manual_seed(0)
    method = case.split("+")[0]
    kw = {"backbone": "convnet_small", **DISTRIBUTED_KWARGS.get(method, {}), **VARIANTS.get(case, {})}
    if "image_size" in method_arguments(method):
        kw["image_size"] = SIZE
    return selfsup.METHODS[method](**kw).train(case in TRAIN_MODE)


def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model.loss(batch)["loss"].backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


METHODS = sorted(selfsup.METHODS) + sorted(VARIANTS)


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    """Every method's gradient of its loss on this rank's share of the batch, replaying the recorded draws."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    images, labels = fixed_batch(BATCH, SIZE)
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for method in METHODS:
        try:
            model = _model(method)
            draws = Draws(BATCH, torch.load(f"{out_dir}/{method}.draws.pt"))
            state = torch.get_rng_state()
            with pytest.MonkeyPatch.context() as mp:
                draws.patch(mp, (rank, world))
                grads = _grads(model, (images[local], labels[local]))
            draws.check_used()
            assert torch.equal(torch.get_rng_state(), state), "a draw reached torch's generator past the wrapped samplers"
        except Exception as e:
            raise RuntimeError(f"{method} on rank {rank}") from e
        torch.save(grads, f"{out_dir}/{method}.rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gradients(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Per method: (the 2 ranks' gradients averaged as DDP does, the single-process gradient). One spawn for all."""
    import torch.multiprocessing as mp

    out, batch, single = tmp_path_factory.mktemp("ddp"), fixed_batch(BATCH, SIZE), {}
    for method in METHODS:
        model, draws = _model(method), Draws(BATCH)
        with pytest.MonkeyPatch.context() as patched:
            draws.patch(patched)
            single[method] = _grads(model, batch)
        torch.save(draws.records, out / f"{method}.draws.pt")
    mp.spawn(_worker, args=(2, f"file://{out}/pg", str(out)), nprocs=2, join=True)
    ddp = {}
    for method in METHODS:
        ranks = [torch.load(out / f"{method}.rank{r}.pt") for r in range(2)]
        assert ranks[0].keys() == ranks[1].keys(), method
        ddp[method] = {n: (ranks[0][n] + ranks[1][n]) / 2 for n in ranks[0]}  # DDP's all-reduce mean
    return {m: (ddp[m], single[m]) for m in METHODS}


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=UNEQUAL[m])) if m in UNEQUAL else m
               for m in METHODS]
)
def test_two_ranks_give_the_single_process_gradient(method, gradients):
    ddp, single = gradients[method]
    assert ddp.keys() == single.keys() and single
    for name, g in single.items():
        torch.testing.assert_close(ddp[name], g, rtol=1e-4, atol=1e-6, msg=f"{method}: {name}")


def test_draws_replay_slices_the_batch_dimension_and_fails_on_an_unattributable_shape():
    """The recorder itself: (S, B, Z) is sliced along B, (B * 2,) by pairs, (Z,) whole; a foreign shape fails."""
    draws = Draws(4)
    with pytest.MonkeyPatch.context() as mp:
        draws.patch(mp)
        a, b, c = torch.randn(1, 4, 3), torch.rand(3), torch.randint(0, 9, (8,))
    for bad in (False, True):
        replay = Draws(4, draws.records)
        with pytest.MonkeyPatch.context() as mp:
            replay.patch(mp, (1, 2))
            assert torch.equal(torch.randn(1, 2, 3), a[:, 2:])
            assert torch.equal(torch.rand(3), b)
            if bad:
                with pytest.raises(AssertionError, match="cannot be attributed"):
                    torch.randint(0, 9, (2,))  # the rank's share of 2 draws per image is (4,)
            else:
                assert torch.equal(torch.randint(0, 9, (4,)), c[4:])
                replay.check_used()
