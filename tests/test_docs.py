"""The docs: the README stays a short guide whose links resolve, the CLI reference covers every command and
method, and the MkDocs site builds with --strict (a broken link or a stale API reference fails it)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hook():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_a_short_guide_whose_local_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 12_000
    links = re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, "the README links into docs/"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing


def test_cli_reference_renders_every_command_and_every_methods_own_options():
    from selfsup.cli import DATA_FLAGS, build_parser
    from selfsup.ssl.module import METHODS
    from selfsup.train import method_arguments

    hook = _hook()
    page = hook.on_page_markdown(f"intro\n\n{hook.MARKER}\n")
    assert hook.MARKER not in page
    commands = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices
    for command in commands:
        assert f"\n## selfsup {command}\n" in page
        assert f"usage: selfsup {command}" in page
    sections = re.split(r"^#### ", page, flags=re.M)[1:]
    assert sorted(s.split("\n", 1)[0] for s in sections) == sorted(METHODS)
    for section in sections:
        method, body = section.split("\n", 1)
        for name in method_arguments(method):
            if name not in DATA_FLAGS:  # e.g. CPC's image_size: the data's --image-size, listed once
                assert "--" + name.replace("_", "-") in body, (method, name)


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="install the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="install the docs extra: pip install -e '.[docs]'")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage: selfsup demo" in (site / "cli" / "index.html").read_text()
    assert "load_encoder" in (site / "api" / "index.html").read_text()
