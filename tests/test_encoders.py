"""Evaluation builds every method's encoder, and its random-init twin, without importing Lightning.

For each registered method (and the variants whose encoder differs), :func:`selfsup.ssl.encoders.build_encoder`
must give the architecture and the random initialisation of ``METHODS[name](**hparams).encoder()`` (the
class, a LightningModule), tensor for tensor; a subprocess builds them all and checks that neither
``pytorch_lightning`` nor ``lightning_fabric`` was imported. ``selfsup features|probe|knn`` on a tiny exported
run (and ``sweep``, ``plot RUN embedding``, ``report``), and ``selfsup.load_encoder`` / ``selfsup.extract_features``, are checked the same way in a subprocess.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selfsup
from selfsup.ssl.encoders import ENCODER_BUILDERS, LIGHTNESS_TASKS, build_encoder

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric")
SIZE = 16
VARIANTS = {  # name -> (method, hparams beyond the small backbone): the encoders each builder may return
    **{m: (m, {}) for m in sorted(selfsup.METHODS)},
    "vae-backbone": ("vae", {"probe_features": "backbone"}),
    "dcgan-pooled": ("dcgan", {"probe_features": "pooled"}),
    "multitask-lightness": ("multitask", {"tasks": "rotation,colorization"}),
    "cpc-grid": ("cpc", {"patch_size": 6, "patch_stride": 2, "max_offset": 3, "skip_overlap": False}),
    "pixelcnn-layer": ("pixelcnn", {"layers": 3, "hidden": 6, "probe_layer": 1}),
    "flow-small": ("flow", {"levels": 2, "steps": 1, "hidden": 8}),
}


def _hparams(method: str, extra: dict) -> dict:
    from selfsup.methods_spec import method_arguments

    out = {"backbone": "convnet_small", **extra}
    if "image_size" in method_arguments(method):
        out["image_size"] = SIZE
    return out


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_builder_gives_the_classes_encoder_and_random_init(variant):
    method, extra = VARIANTS[variant]
    hp = _hparams(method, extra)
    ours = _seeded(lambda: build_encoder(method, hp))
    theirs = _seeded(lambda: selfsup.METHODS[method](**hp).encoder())
    assert type(ours) is type(theirs) and ours.num_features == theirs.num_features
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(reference)
    for k, v in reference.items():
        assert torch.equal(mine[k], v), f"{variant}: {k} differs from the class's random init"
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_every_registered_method_has_a_builder():
    missing = sorted(set(selfsup.METHODS) - set(ENCODER_BUILDERS))
    assert not missing, (f"methods {missing} have no encoder builder, so evaluating them imports Lightning: register "
                         "one in selfsup/ssl/encoders.py (register_encoder(NAME)(image_encoder) when the method's "
                         "encoder is SSLModule.encoder's)")


def test_lightness_tasks_are_the_tasks_that_need_lightness():
    from selfsup.pretext.task import TASKS

    assert {name for name, task in TASKS.items() if task.in_chans == 1} == LIGHTNESS_TASKS


def test_builder_checks_hparams_in_one_line():
    from selfsup.errors import ConfigError

    with pytest.raises(ConfigError, match="rotation has no argument 'head_hiden' \\(did you mean 'head_hidden'\\?\\)"):
        build_encoder("rotation", {"head_hiden": 2}, where="x/config.json")
    with pytest.raises(ConfigError, match="x/config.json.latent_dim must be"):
        build_encoder("vae", {"latent_dim": "many"}, where="x/config.json")


def _python(code: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "COLUMNS": "100", "HOME": str(cwd),
           "SELFSUP_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def twins_without_lightning(tmp_path_factory):
    """Every variant's twin built in one fresh interpreter: ``{variant: num_features}`` and the Lightning
    modules it imported."""
    cases = {v: (m, _hparams(m, extra)) for v, (m, extra) in VARIANTS.items()}
    code = f"""
import json, sys, torch
from selfsup.ssl.encoders import build_encoder
out = {{}}
for variant, (method, hp) in {cases!r}.items():
    out[variant] = build_encoder(method, hp).num_features
print(json.dumps({{"features": out, "lightning": sorted({{m.split(".")[0] for m in sys.modules}} & set({LIGHTNING!r}))}}))
"""
    done = _python(code, tmp_path_factory.mktemp("twins"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_twin_builds_without_lightning(variant, twins_without_lightning):
    method, extra = VARIANTS[variant]
    assert twins_without_lightning["lightning"] == []
    assert twins_without_lightning["features"][variant] == build_encoder(method, _hparams(method, extra)).num_features


WRAPPER = f"""
import json, runpy, sys
sys.argv = ["selfsup", *json.loads(sys.argv[1])]
try:
    runpy.run_module("selfsup", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({LIGHTNING!r}))
sys.__stdout__.write("\\nLIGHTNING " + json.dumps(loaded) + "\\n")
sys.exit(code)
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A rotation run of two steps on 16 px digits, exported."""
    from selfsup.train import pretrain

    out = tmp_path_factory.mktemp("runs")
    cfg = {"model": {"backbone": "convnet_small"}, "data": {"data": "digits", "image_size": SIZE, "batch_size": 64},
           "trainer": {"max_steps": 2}, "online_probe": False, "output": str(out), "name": "tiny"}
    return pretrain(cfg).run_dir


@pytest.mark.slow
@pytest.mark.parametrize("command,expected", [
    (["features", "{run}", "--device", "cpu"], "test (360, 128)"),
    (["probe", "{run}", "--device", "cpu"], "results: "),
    (["knn", "{run}", "--device", "cpu", "--k", "5"], "results: "),
    (["sweep", "{run}", "--device", "cpu", "--ks", "2,all", "--seeds", "1", "--no-baselines"], "plot: "),
    (["plot", "{run}", "embedding"], "embedding: "),
    (["report", "{run}", "--output", "{run}/report.html"], "report.html"),
])
def test_evaluating_an_export_imports_no_lightning(tiny_run, command, expected):
    args = [a.format(run=tiny_run) for a in command]
    done = _python(f"import sys; sys.argv = ['x', {json.dumps(json.dumps(args))}]\n" + WRAPPER, tiny_run.parent)
    out, _, loaded = done.stdout.rpartition("\nLIGHTNING ")
    assert done.returncode == 0 and loaded, done.stderr[-3000:]
    assert expected in out
    assert json.loads(loaded) == [], f"selfsup {' '.join(args)} imported {loaded}"


@pytest.mark.slow
def test_load_encoder_and_extract_features_import_no_lightning(tiny_run):
    code = f"""
import json, sys, selfsup
enc = selfsup.load_encoder({str(tiny_run)!r})
feats = selfsup.extract_features(enc, "digits", "val", progress=False)
print(json.dumps([list(feats.x.shape), sorted({{m.split(".")[0] for m in sys.modules}} & set({LIGHTNING!r}))]))
"""
    done = _python(code, tiny_run.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    shape, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert shape == [360, 128] and loaded == []
