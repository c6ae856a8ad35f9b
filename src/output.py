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
the same captions as ``<image name>.txt`` files; naming and delivery rules are in ``deliver``.
"""
from __future__ import annotations

from typing import Any, Sequence

import deliver
from config import Config
from errors import JobError, short
from inputs import FORMAT_LIST
from params import CaptionResult, compose

MAX_ERRORS_IN_MESSAGE = 10


def build(request: Any, results: Sequence[tuple[Any, CaptionResult]],
          failures: Sequence[tuple[tuple[int, int], str, str]], skipped: int, engine: Any,
          timings: dict[str, float], job_id: str, cfg: Config) -> dict:
    """Merge captioned images and failures into the output, in input order; with
    ``output_format: "zip"`` add the caption zip (uploaded for ``job_id`` when ``cfg`` names a
    bucket)."""
    rows: list[tuple[tuple[int, int], dict]] = []
    errors: list[tuple[tuple[int, int], dict]] = []
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
    if not rows:
        raise JobError(nothing_captioned_message([e for _, e in errors], skipped))
    out: dict[str, Any] = {"captions": [r for _, r in rows]}
    if errors:
        out["errors"] = [e for _, e in errors]
    if skipped:
        out["skipped"] = skipped
    out.update(model=engine.model_id, engine=engine.name, timings=timings)
    if request.output_format == "zip":
        members = {entry.order: entry.member for entry, _ in results}
        out.update(deliver.zip_fields(request, rows, members, job_id, cfg))
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
