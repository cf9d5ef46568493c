"""Issue 21 (reliability, round 3): crafted exports, full disks, bad files, start-up signals."""

import json

import pytest

from selfsup.errors import ConfigError
from tests.conftest import run_cli_here


@pytest.mark.parametrize("config, says", [
    ({"hparams": [1, 2]}, "hparams must be a mapping"),
    ({"hparams": "lr=0.1"}, "hparams must be a mapping"),
    ({"method": ["rotation"]}, "unknown method"),
    ({"method": 3}, "unknown method"),
])
def test_an_export_config_of_the_wrong_shape_is_one_line(tmp_path, config, says):
    """Item 8: ``"hparams": [1, 2]`` was ``TypeError: 'int' object is not iterable`` from build_method."""
    from selfsup import load_encoder

    export = tmp_path / "export"
    export.mkdir()
    base = {"format": 1, "method": "rotation", "hparams": {"backbone": "convnet_small"}, "num_features": 64}
    from selfsup.ssl.module import EXPORT_FORMAT

    (export / "config.json").write_text(json.dumps({**base, "format": EXPORT_FORMAT, **config}))
    (export / "encoder.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=says) as err:
        load_encoder(export)
    assert str(export / "config.json") in str(err.value)
    r = run_cli_here("probe", str(export), "--data", "digits", "--image-size", "8", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr
