"""The CLI answers ``--help`` and argument errors without importing torch, Lightning, timm or kornia.

Each case runs ``python -m selfsup ...`` in a subprocess through a small wrapper that reports which heavy
packages the process imported; the speed itself is measured by ``benchmarks/cli_speed.py``, not here.
"""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from selfsup import methods_spec
from selfsup.methods_spec import SPECS, ArgSpec, differences, specs_from_classes

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "pytorch_lightning", "lightning", "lightning_fabric", "timm", "kornia", "faiss",
         "sklearn", "numpy", "safetensors", "matplotlib")
WRAPPER = f"""
import json, runpy, sys
args = json.loads(sys.argv[1])
sys.argv = ["selfsup", *args]
try:
    runpy.run_module("selfsup", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
sys.__stdout__.write("\\nHEAVY " + json.dumps(heavy) + "\\n")
sys.exit(code)
"""


def run_selfsup(*args: str, cwd: Path) -> tuple[int, str, list[str]]:
    """``selfsup ARGS`` in a fresh interpreter: exit status, stdout + stderr, and the heavy packages it imported."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    done = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    out, _, heavy = done.stdout.rpartition("\nHEAVY ")
    assert heavy, done.stderr[-2000:]
    return done.returncode, out + done.stderr, json.loads(heavy)


def _commands() -> list[str]:
    from selfsup.cli import build_parser

    return list(next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices)


@pytest.mark.parametrize("args,expected", [
    ([], "usage: selfsup"),
    *[([command], f"usage: selfsup {command}") for command in _commands()],
    (["pretrain", "--method", "cpc"], "cpc options"),
    (["pretrain", "--method", "pixelcnn"], "--logistic-components"),
])
def test_help_imports_nothing_heavy(args, expected, tmp_path):
    code, out, heavy = run_selfsup(*args, "--help", cwd=tmp_path)
    assert code == 0, out
    assert expected in out
    assert heavy == [], f"selfsup {' '.join(args)} --help imported {heavy}"


BAD_CONFIG = "method: rotaton\n"


@pytest.mark.parametrize("args,message", [
    (["pretrain", "--method", "rotaton"], "unknown method 'rotaton' (did you mean 'rotation'?)"),
    (["pretrain", "--config", "bad.yaml"], "bad.yaml: unknown method 'rotaton'"),
    (["pretrain", "--config", "missing.yaml"], "config file missing.yaml not found"),
    (["pretrain", "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["pretrain", "--lr", "-1"], "model.lr must be a positive number, got -1.0"),
    (["pretrain", "--max-epochs", "-1", "--max-steps", "-1"], "the run would never end"),
    (["pretrain", "--max-time", "soon"], "argument --max-time: must be a duration"),
    (["pretrain", "--name", "../x"], "name must be a plain run name"),
    (["pretrain", "--method", "jigsaw", "--num-permutations", "x"], "argument --num-permutations: invalid int value: 'x'"),
    (["pretrain", "--mask-ratio", "3"], "unrecognized arguments: --mask-ratio 3"),
    (["probe", "--bogus"], "unrecognized arguments: --bogus"),
    (["probe"], "give either a run or export directory"),
    (["probe", "runs/nope"], "runs/nope does not exist"),
    (["knn", "--random-init", "convnet_small", "--layers", "best"], "--layers best is chosen by a probe"),
    (["features", "--random-init", "convnet_small", "--output", "bad.yaml"], "--output bad.yaml is a file"),
    (["sweep", "--random-init", "convnet_small", "--ks", "0"], "labels per class must be at least 1"),
    (["report", "runs/nope"], "runs/nope does not exist"),
    (["plot", "runs/nope", "curves"], "runs/nope does not exist"),
    (["plot", "runs/nope", "histogram"], "invalid choice: 'histogram'"),
    (["demo", "--epochs", "0"], "must be a positive integer"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_argument_errors_are_one_line_and_import_nothing_heavy(args, message, tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD_CONFIG)
    code, out, heavy = run_selfsup(*args, cwd=tmp_path)
    assert code == 2, out
    assert message in out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfsup"), out
    assert heavy == [], f"selfsup {' '.join(args)} imported {heavy}"


def test_importing_selfsup_is_light_and_its_names_load_on_use(tmp_path):
    code = ("import sys, selfsup\n"
            "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pytorch_lightning'})\n"
            "before = heavy()\n"
            "from selfsup import extract_features, load_encoder\n"
            "loaded = heavy()\n"  # evaluating needs no Lightning; the methods' classes do
            "names = sorted(selfsup.METHODS)\n"
            "print(before, loaded, heavy(), names == selfsup.list_methods(), 'rotation' in selfsup.METHODS,"
            " 'METHODS' in dir(selfsup), callable(load_encoder) and callable(extract_features))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"},
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["[]", "['torch']", "['pytorch_lightning',", "'torch']", "True", "True", "True",
                                   "True"], done.stderr


def test_the_declared_specs_are_the_classes():
    problems = differences(specs_from_classes(), SPECS)
    assert not problems, ("selfsup/methods_spec.py differs from the method classes; run "
                          "`python -m selfsup.methods_spec --write`, or add:\n" + "\n".join(problems))


def test_a_missing_spec_names_what_to_add():
    actual = specs_from_classes()
    declared = {m: dict(args) for m, args in actual.items() if m != "jigsaw"}
    del declared["rotation"]["lr"]
    declared["rotation"]["no_such"] = ArgSpec("int", 1, "")
    problems = "\n".join(differences(actual, declared))
    assert "method 'jigsaw' is registered but has no entry in SPECS; add it:" in problems
    entry = problems.split("add it:\n", 1)[1].split("\nrotation:", 1)[0]
    assert eval("{" + entry + "}", {"ArgSpec": ArgSpec}) == {"jigsaw": actual["jigsaw"]}  # the printed entry is the spec
    lr = actual["rotation"]["lr"]
    assert (f"rotation: argument 'lr' has no spec; add to SPECS['rotation']:\n"
            f"        'lr': ArgSpec({lr.annotation!r}, {lr.default!r}, {lr.help!r}),") in problems
    assert "rotation: SPECS declares argument 'no_such', which the class does not take" in problems


def test_the_generated_block_is_what_write_renders():
    text = Path(methods_spec.__file__).read_text()
    assert methods_spec.render(SPECS) in text
    assert methods_spec.render(specs_from_classes()) == methods_spec.render(SPECS)


def test_data_types_are_the_datamodules_annotations():
    from selfsup.config import DATA_DEFAULTS, DATA_TYPES, data_arguments
    from selfsup.data.datamodule import SelfSupDataModule

    params = inspect.signature(SelfSupDataModule.__init__).parameters
    assert {k: params[k].annotation for k in DATA_DEFAULTS} == {k: DATA_TYPES.get(k) for k in DATA_DEFAULTS}, (
        "selfsup/config.py DATA_TYPES must give SelfSupDataModule's annotation of every DATA_DEFAULTS key")
    assert list(data_arguments()) == list(DATA_DEFAULTS)


def test_a_method_registered_at_run_time_gets_its_options(monkeypatch):
    from selfsup import cli
    from selfsup.methods_spec import method_names
    from selfsup.pretext.rotation import Rotation
    from selfsup.ssl.module import METHODS

    class Spinning(Rotation):
        """Rotation with a twist.

        Args:
            spin: turns per image.
        """

        def __init__(self, *, spin: int = 2, **base) -> None:
            super().__init__(**base)

    monkeypatch.setitem(METHODS, "spinning", Spinning)
    assert "spinning" in method_names()
    pretrain = next(a for a in cli.build_parser("spinning")._actions if hasattr(a, "choices") and a.choices)
    text = pretrain.choices["pretrain"].format_help()
    assert "spinning options" in text and "--spin INT" in text and "turns per image. (default: 2)" in text


@pytest.mark.slow
def test_cli_speed_benchmark_writes_its_table(tmp_path, monkeypatch):
    import statistics

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cli_speed

    out = tmp_path / "cli_speed.json"
    assert cli_speed.main(["--rounds", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["command"]: r for r in result["rows"]}
    assert set(rows) == set(cli_speed.COMMANDS)
    assert rows["import torch"]["ratios"] == [1.0, 1.0]
    for row in rows.values():
        assert row["ratio_to_import_torch"] == statistics.median(row["ratios"]) and len(row["seconds"]) == 2
        assert row["within_goal"] is (None if not row["command"].startswith("selfsup") else True)
    assert result["machine"]["loadavg_before"] and "cli_speed.py" in result["command"]
