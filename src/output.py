"""The job's output document.

Success (RunPod status COMPLETED)::

    {"captions": [{"image_path": "shots/cat.jpg", "caption": "a cat on a sill"}],   # input order
     "errors":   [{"image_path": "shots/broken.jpg", "error": "not a readable image: ..."}],
     "skipped":  2,                      # zip members that are not images (only when > 0)
     "model": "...", "engine": "transformers",
     "timings": {"fetch_s": ..., "caption_s": ..., "total_s": ...}}

``errors`` and ``skipped`` appear only when non-empty / non-zero. With ``num_captions > 1`` each
caption entry also has ``"alternatives"``: the other ``num_captions - 1`` captions, best first
(``caption`` stays the single best string). When not one image could be captioned the job fails
(``JobError``) with a message that lists the first problems.

With ``output_format: "zip"`` the output also has one of ``captions_zip_url``, ``captions_zip``
(base64) or ``captions_zip_error``, last (after ``timings``, so the readable part comes first):
the same captions as ``<image name>.txt`` files. The job (``jobs.Worker``) adds them from
``deliver`` (naming and delivery rules are there): building the document here uploads nothing.

``collect`` puts the captions and failures in output order, ``build`` makes the document from
them; neither has side effects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from errors import JobError
from params import CaptionResult, compose
from text import FORMAT_LIST, short

MAX_ERRORS_IN_MESSAGE = 10

Order = tuple[int, int]  # (source index, position within that source)


@dataclass(frozen=True)
class Captions:
    """A job's captioned images and failures, each keyed by its output order, sorted."""
    rows: list[tuple[Order, dict]]  # {"image_path", "caption"[, "alternatives"]}
    errors: list[tuple[Order, dict]]  # {"image_path", "error"}
    members: dict[Order, str]  # each image's raw zip member name ("" for a whole source)


def collect(request: Any, results: Sequence[tuple[Any, CaptionResult]],
            failures: Sequence[tuple[Order, str, str]]) -> Captions:
    """Merge captioned images (``(entry, result)``, an entry having ``order``, ``image_path``
    and ``member``) and failures (``(order, image_path, error)``) in input order."""
    rows: list[tuple[Order, dict]] = []
    errors: list[tuple[Order, dict]] = []
    for entry, res in results:
        if res.error is not None:
            errors.append((entry.order, {"image_path": entry.image_path, "error": res.error}))
            continue
        texts = [compose(request.prompt, c, request.include_prompt) for c in res.captions]
        row: dict[str, Any] = {"image_path": entry.image_path, "caption": texts[0]}
        if request.generation.num_captions > 1:
            row["alternatives"] = texts[1:]
        rows.append((entry.order, row))
    errors += [(order, {"image_path": path, "error": err}) for order, path, err in failures]
    rows.sort(key=lambda r: r[0])
    errors.sort(key=lambda r: r[0])
    return Captions(rows, errors, {entry.order: entry.member for entry, _ in results})


def build(captions: Captions, *, skipped: int, model: str, engine: str,
          timings: dict[str, float]) -> dict:
    """The output document (see module docstring), without the caption zip's field; raises
    ``JobError`` when not one image was captioned."""
    if not captions.rows:
        raise JobError(nothing_captioned_message([e for _, e in captions.errors], skipped))
    out: dict[str, Any] = {"captions": [r for _, r in captions.rows]}
    if captions.errors:
        out["errors"] = [e for _, e in captions.errors]
    if skipped:
        out["skipped"] = skipped
    out.update(model=model, engine=engine, timings=timings)
    return out


def nothing_captioned_message(errors: Sequence[dict], skipped: int) -> str:
    if not errors:
        extra = f" ({skipped} non-image files were skipped)" if skipped else ""
        return (f"no images found to caption{extra}: send {FORMAT_LIST} images, or a zip of "
                "them")
    shown = "; ".join(f"{short(e['image_path'])}: {e['error']}" for e in errors[:MAX_ERRORS_IN_MESSAGE])
    more = len(errors) - MAX_ERRORS_IN_MESSAGE
    tail = f"; ... and {more} more" if more > 0 else ""
    return f"no image could be captioned ({len(errors)} failed): {shown}{tail}"
