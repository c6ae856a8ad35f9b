"""Judging a job's answer: ``outcomes`` ({image_path: None or its error}), ``outcome_problems``
(how it differs from what was expected), and ``within`` (a hang becomes a failure)."""
from __future__ import annotations

import threading
from typing import Callable


def outcomes(out: dict) -> dict[str, "str | None"]:
    """A job's result as {image_path: None (captioned) or its error}, in output order."""
    got: dict[str, str | None] = {c["image_path"]: None for c in out.get("captions", [])}
    got.update({e["image_path"]: e["error"] for e in out.get("errors", [])})
    return got


def outcome_problems(out: dict, expected: dict[str, "str | None"]) -> list[str]:
    """How a job's outcomes differ from ``expected`` ({image_path: None = captioned, or the
    start of its error message}); [] when they match exactly: the same images, each once."""
    got = outcomes(out)
    entries = len(out.get("captions", [])) + len(out.get("errors", []))
    problems = [f"{entries - len(got)} image paths answered twice"] if entries > len(got) else []
    problems += [f"{path}: missing from the output" for path in expected if path not in got]
    problems += [f"{path}: not expected in the output" for path in got if path not in expected]
    for path, want in expected.items():
        if path not in got:
            continue
        have = got[path]
        if want is None and have is not None:
            problems.append(f"{path}: expected a caption, got the error {have!r}")
        elif want is not None and (have is None or not have.startswith(want)):
            problems.append(f"{path}: expected an error starting {want!r}, got {have!r}")
    return problems


def within(seconds: float, fn: Callable, *args: object):
    """``fn(*args)``, or AssertionError when it has not returned within ``seconds``: a hang
    becomes a failure (the call is left running in a daemon thread)."""
    done: list = []
    thread = threading.Thread(target=lambda: done.append(fn(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert done, f"{getattr(fn, '__name__', fn)} did not return within {seconds:g} s"
    return done[0]
