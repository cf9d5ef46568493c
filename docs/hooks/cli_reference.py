"""MkDocs hook: the CLI reference page (``cli.md``), rendered from selfsup's own argparse parsers.

The page holds a marker that this hook replaces with ``selfsup --help``, every command's ``--help`` and
every method's own ``pretrain`` options, so the reference cannot drift from the code: a renamed flag
changes the page at the next ``mkdocs build``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- selfsup-cli-reference -->"
WIDTH = 100  # columns of the rendered help (argparse reads $COLUMNS)


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def method_options(parser: argparse.ArgumentParser, method: str) -> str:
    """The help of the ``<method> options`` group of a ``pretrain`` parser, as ``--help`` prints it."""
    group = next(g for g in parser._action_groups if g.title and g.title.startswith(f"{method} options"))
    fmt = parser._get_formatter()
    fmt.start_section(group.title)
    fmt.add_text(group.description)
    fmt.add_arguments(group._group_actions)
    fmt.end_section()
    return fmt.format_help()


def _block(text: str) -> list[str]:
    return ["```text", text.strip("\n"), "```", ""]


def cli_reference() -> str:
    """Markdown: ``selfsup --help``, each command's ``--help``, then each method's ``pretrain`` options."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        import selfsup  # noqa: F401  (registers the methods)
        from selfsup.cli import build_parser
        from selfsup.ssl.module import METHODS

        parser = build_parser("rotation")
        out = ["## selfsup", "", *_block(parser.format_help())]
        for name, command in _commands(parser).items():
            out += [f"## selfsup {name}", "", *_block(command.format_help())]
            if name == "pretrain":
                out += ["### Each method's options", "",
                        "`selfsup pretrain --method NAME --help` shows the options above with NAME's own group "
                        "in place of rotation's. Every method's group:", ""]
                for method in sorted(METHODS):
                    pretrain = _commands(build_parser(method))["pretrain"]
                    out += [f"#### {method}", "", *_block(method_options(pretrain, method))]
        return "\n".join(out)
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns


def on_page_markdown(markdown: str, **kwargs) -> str:
    return markdown.replace(MARKER, cli_reference()) if MARKER in markdown else markdown
