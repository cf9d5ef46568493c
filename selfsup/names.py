"""File and class names that are not valid UTF-8.

Linux allows any bytes in a file name except ``/`` and NUL; Python presents the bytes that are not UTF-8 as
lone surrogates (PEP 383's ``surrogateescape``: ``b'\\xff'`` is ``'\\udcff'``). Such a string cannot be
encoded as UTF-8, printed to a UTF-8 terminal, drawn by matplotlib or written to a UTF-8 text file. So a name
is hashed as its bytes on the disk (:func:`name_bytes`) and shown with replacement characters
(:func:`display_name`). A valid UTF-8 name is unchanged by both: the hashes of such names (subset draws,
cache keys, data fingerprints) are those they always were.
"""

from __future__ import annotations


def name_bytes(name: str) -> bytes:
    """The bytes a file name has on the disk: ``os.fsencode(name)`` on a UTF-8 file system (Linux, macOS),
    whatever the locale, so a hash of it is the same on every machine. A valid UTF-8 name gives
    ``name.encode()``."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate outside U+DC80..U+DCFF (Windows' WTF-16 names)
        return name.encode("utf-8", "surrogatepass")


def display_name(name: str) -> str:
    """``name`` with each byte that is not UTF-8 shown as U+FFFD, safe to print, draw or write as UTF-8."""
    return name_bytes(str(name)).decode("utf-8", "replace")


def from_bytes(raw: bytes) -> str:
    """A name read as bytes (a subset file's line) as Python presents the same name read from the disk
    (``os.fsdecode`` on a UTF-8 file system)."""
    return raw.decode("utf-8", "surrogateescape")


def displayable_figure(fig):
    """``fig`` with every text (titles, tick labels, legend entries) passed through :func:`display_name`:
    matplotlib cannot draw a lone surrogate (a ``TypeError`` from its font code). Call it before saving."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        shown = text.get_text()
        if isinstance(shown, str) and shown != display_name(shown):
            text.set_text(display_name(shown))
    return fig


def is_utf8_name(name: str) -> bool:
    """Whether ``name`` is valid UTF-8 (no byte shown as a lone surrogate): what libraries that take a
    path as UTF-8 text (safetensors' ``safe_open``) can open."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
