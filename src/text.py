"""Text helpers for messages and logs: sizes, user input shortened or made printable, and the
accepted image formats as a message names them. A leaf: it imports nothing of the project, so
any module (the inputs at the start of the pipeline, the output and delivery at its end) can
use it.
"""
from __future__ import annotations

FORMAT_LIST = "JPEG, PNG, GIF, WebP, BMP, TIFF or AVIF"


def human_size(n: float) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{n:.0f} bytes"


def short(text: str, limit: int = 120) -> str:
    """Shorten user-supplied text (a URL, a member name) for a message: never dump megabytes."""
    text = str(text)
    if text.startswith("data:"):
        head = text.split(",", 1)[0]
        return (head[:60] + ",...") if len(head) <= 60 else head[:60] + "..."
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str) -> str:
    """``text`` with every unprintable character (controls such as a newline, lone surrogates,
    bidi overrides) written as its escape (``\\n``, ``\\ud800``): what comes from a job's input
    (a URL, a member name) goes into labels, messages and logs as one readable line that also
    encodes as UTF-8. A lone surrogate, legal in JSON input, would otherwise make the result
    unsendable (runpod encodes it as UTF-8: the local API answers 500, RunPod gets no result)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)
