"""Every bad input is one line naming where it is, exit code 2, and nothing written (issue 11, item 7)."""

import pytest

from selfsup import cli
from selfsup.config import default_config, load_config, merge_config, parse_duration, validate_config
from selfsup.errors import ConfigError, SelfsupError


def _validate(override: dict) -> dict:
    return validate_config(merge_config(default_config("rotation"), override))


@pytest.mark.parametrize(
    "override,message",
    [
        ({"model": {"lr": "fast"}}, "model.lr must be a number, got 'fast'"),
        ({"model": {"flip": "yes"}}, "model.flip must be true or false, got 'yes'"),
        ({"model": {"backbone": 5}}, "model.backbone must be a string, got 5"),
        ({"model": {"head_hidden": 1.5}}, "model.head_hidden must be an integer, got 1.5"),
        ({"trainer": {"max_epochs": "ten"}}, "trainer.max_epochs must be an integer, got 'ten'"),
        ({"trainer": {"max_epochs": True}}, "trainer.max_epochs must be an integer, got True"),
        ({"trainer": {"max_epochs": -5}}, "trainer.max_epochs must be >= -1, got -5"),
        ({"trainer": {"max_time": "soon"}}, "trainer.max_time must be a duration"),
        ({"data": {"batch_size": "big"}}, "data.batch_size must be an integer, got 'big'"),
        ({"data": {"batch_size": 0}}, "data.batch_size must be >= 1, got 0"),
        ({"seed": "zero"}, "seed must be an integer, got 'zero'"),
        ({"checkpoint_every": 0}, "checkpoint_every must be >= 1, got 0"),
        ({"model": {"lrr": 0.1}}, "unknown config.model key 'lrr' (did you mean 'lr'?)"),
        ({"modle": {}}, "unknown config key 'modle' (did you mean 'model'?)"),
        ({"trainer": {"max_epoch": 3}}, "(did you mean 'max_epochs'?)"),
        ({"model": [1, 2, 3]}, "config.model: expected a mapping of keys to values, got [1, 2, 3]"),
    ],
)
def test_every_bad_value_is_named(override, message):
    with pytest.raises(ConfigError) as err:
        _validate(override)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override", [
    {"trainer": {"max_epochs": -1, "max_steps": -1, "max_time": "1m"}},  # a time limit ends it
    {"trainer": {"max_epochs": -1, "max_steps": 5}},
    {"trainer": {"max_epochs": -1, "max_steps": -1, "fast_dev_run": 1}},
    {"model": {"momentum": 0.0, "weight_decay": 0.0, "warmup_epochs": 0.0}, "seed": 4294967295},
])
def test_edge_values_in_range_pass(override):
    _validate(override)


def test_resume_with_limits_that_never_end_is_refused(tmp_path):
    from selfsup.train import resolve_config

    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("method: rotation\ntrainer: {max_epochs: -1, max_steps: 5}\n")
    with pytest.raises(ConfigError, match="would never end"):
        resolve_config({"output": str(tmp_path), "name": "r", "trainer": {"max_steps": -1}}, resume=True)


def test_good_values_pass_and_are_normalised():
    cfg = _validate({"model": {"lr": "1e-3", "crop_scale": 1}, "trainer": {"max_time": "1h30m", "devices": [0, 1],
                                                                          "max_epochs": 3.0}})
    assert cfg["model"]["lr"] == 1e-3 and cfg["trainer"]["max_time"] == "00:01:30:00"
    assert cfg["trainer"]["max_epochs"] == 3 and isinstance(cfg["trainer"]["max_epochs"], int)
    assert cfg["trainer"]["devices"] == [0, 1]


@pytest.mark.parametrize("text,expected", [("3m", "00:00:03:00"), ("90s", "00:00:01:30"), ("1h30m", "00:01:30:00"),
                                           ("2d", "02:00:00:00"), ("00:01:00:00", "00:01:00:00"), (None, None),
                                           ("45", "00:00:00:45")])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["3x", "", "0s", "1:2", "m3", "-5m"])
def test_parse_duration_rejects(text):
    if text == "":
        assert parse_duration(text) is None
        return
    with pytest.raises(ConfigError):
        parse_duration(text)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"model: {lr: 0.1\n", "is not valid YAML"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "is a binary file"),
        (b"\xff\xfe\xfa not utf8", "is not UTF-8 text"),
        (b"- a\n- b\n", "expected a mapping"),
    ],
)
def test_load_config_bad_files(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_load_config_empty_and_missing(tmp_path):
    (tmp_path / "e.yaml").write_text("")
    assert load_config(tmp_path / "e.yaml") == {}
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def _cli(capsys, monkeypatch, tmp_path, *argv):
    monkeypatch.chdir(tmp_path)
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse errors exit
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize(
    "argv,config,message",
    [
        (["--method", "rotaton"], None, "unknown method 'rotaton' (did you mean 'rotation'?)"),
        (["--max-time", "3x"], None, "--max-time: must be a duration like 90s"),
        (["--lr", "fast"], None, "argument --lr: invalid float value: 'fast'"),
        (["--lrr", "0.1"], None, "unrecognized arguments: --lrr"),
        ([], "model:\n  lr: fast\n", "c.yaml: model.lr must be a number, got 'fast'"),
        ([], "trainer:\n  max_epochs: ten\n", "c.yaml: trainer.max_epochs must be an integer, got 'ten'"),
        ([], "model: [1, 2, 3]\n", "c.yaml: config.model: expected a mapping"),
        ([], "model: {lr: 0.1\n", "c.yaml is not valid YAML"),
        ([], b"\x00\x01\x02\x03", "c.yaml is a binary file"),
        ([], "method: rotaton\n", "c.yaml: unknown method 'rotaton' (did you mean 'rotation'?)"),
        ([], "model:\n  lrr: 0.1\n", "c.yaml: unknown config.model key 'lrr' (did you mean 'lr'?)"),
        (["--backbone", "resnet_typo", "--max-epochs", "1"], None, "unknown backbone 'resnet_typo'"),
        (["--trainer-typo"], None, "unrecognized arguments"),
        (["--seed", "-1"], None, "seed must be a whole number from 0 to 4294967295, got -1"),
        (["--seed", "1.5"], None, "argument --seed: invalid int value: '1.5'"),
        (["--momentum", "1.5"], None, "model.momentum must be in [0, 1), got 1.5"),
        (["--weight-decay", "-0.1"], None, "model.weight_decay must be a number >= 0, got -0.1"),
        (["--warmup-epochs", "-1"], None, "model.warmup_epochs must be a number >= 0, got -1.0"),
        (["--max-epochs", "0"], None, "trainer.max_epochs must be >= 1, or -1 for no limit, got 0"),
        (["--max-steps", "0"], None, "trainer.max_steps must be >= 1, or -1 for no limit, got 0"),
        (["--max-epochs", "-1", "--max-steps", "-1"], None, "so the run would never end"),
        ([], "seed: 4294967296\n", "c.yaml: seed must be a whole number from 0 to 4294967295"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(capsys, monkeypatch, tmp_path, argv, config, message):
    if config is not None:
        path = tmp_path / "c.yaml"
        path.write_bytes(config if isinstance(config, bytes) else config.encode())
        argv = [*argv, "--config", "c.yaml"]
    rc, err = _cli(capsys, monkeypatch, tmp_path, "pretrain", *argv)
    assert rc == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing written before the config is known good


def test_cli_unwritable_output_is_one_line(capsys, monkeypatch, tmp_path):
    (tmp_path / "afile").write_text("x")  # the output folder cannot be made under a file (root ignores chmod)
    rc, err = _cli(capsys, monkeypatch, tmp_path, "pretrain", "--backbone", "convnet_small", "--image-size", "8",
                   "--output", "afile/runs", "--max-steps", "1")
    assert rc == 2 and "afile/runs" in err and len(err.strip().splitlines()) == 1


def test_errors_are_typed():
    with pytest.raises(SelfsupError):
        _validate({"model": {"lr": "fast"}})
    assert issubclass(ConfigError, ValueError)


def test_cli_full_disk_is_one_line_and_leaves_no_run_dir(capsys, monkeypatch, tmp_path):
    import errno

    import selfsup.train

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(selfsup.train, "atomic_write_text", full)
    rc, err = _cli(capsys, monkeypatch, tmp_path, "pretrain", "--backbone", "convnet_small", "--image-size", "8",
                   "--name", "full", "--max-steps", "1")
    assert rc == 2 and "No space left on device" in err and "config.yaml" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "full").exists()  # the claimed directory is given back
