"""The outcome table: what a job's final state means for its images (recorded, or resubmitted),
and the rows of a COMPLETED job mapped back to the items sent.

- Outcomes: COMPLETED records the captions and per-image errors. FAILED with ``invalid
  input: ...`` is recorded for the job's images without a retry; so is the worker's ``no image
  could be captioned`` (every image failed on the worker, after its own download retries: each
  image gets its own reason from the message). Any other FAILED, TIMED_OUT, CANCELLED, an
  answer with ``refresh_worker``, or a lost job (status not found, or no change for
  ``--job-timeout`` = 600 s) is cancelled (best effort) and its images resubmitted, up to
  ``--retries`` (3) times, then recorded with the last reason. The timeout counts from the last
  change the client saw: the job's status or progress text, and, while a job is still queued,
  any change of any job of the run (a long queue that moves is not lost).
"""
from __future__ import annotations

import json
import re
from typing import Sequence

from text import short

from .work import Item, Job, Row

NO_RETRY = ("invalid input:",)  # the worker's verdict on the request itself
ALL_FAILED = ("no image could be captioned", "no images found to caption")


def classify(state: dict) -> tuple[str, str]:
    """The outcome table: ("ok" | "final" | "all_failed" | "retry", reason)."""
    status = state.get("status")
    output = state.get("output")
    if status == "COMPLETED":
        if isinstance(output, dict) and output.get("refresh_worker"):
            return "retry", f"the worker asked to be replaced: {error_text(output)}"
        if isinstance(output, dict) and "error" in output and "captions" not in output:
            status, state = "FAILED", {"error": output["error"]}
        elif not isinstance(output, dict) or not isinstance(output.get("captions"), list):
            return "retry", "the job COMPLETED without captions in its output"
        else:
            return "ok", ""
    if status == "FAILED":
        reason = error_text(state)
        if reason.startswith(NO_RETRY):
            return "final", reason
        if reason.startswith(ALL_FAILED):
            return "all_failed", reason
        return "retry", f"the job FAILED: {reason}"
    if status in ("TIMED_OUT", "CANCELLED"):
        return "retry", f"the job was {status} on the endpoint"
    return "retry", f"the endpoint answered status {short(str(status), 40)}"


def error_text(state: dict) -> str:
    err = state.get("error")
    if isinstance(err, str):
        try:  # RunPod wraps a handler's exception as JSON text
            decoded = json.loads(err)
            if isinstance(decoded, dict) and "error_message" in decoded:
                err = str(decoded["error_message"])
        except ValueError:
            pass
        return err
    return "no error message" if err is None else short(json.dumps(err), 300)


def split_reasons(message: str, labels: Sequence[str]) -> dict[str, str]:
    """Each image's own reason in ``no image could be captioned (N failed): a: why; b: why``."""
    head, sep, body = message.partition("): ")
    if not sep:
        return {}
    found = []
    for label in labels:
        marker = f"{short(label)}: "
        start = 0
        while (pos := body.find(marker, start)) >= 0:
            if pos == 0 or body[pos - 2:pos] == "; ":
                found.append((pos, label, len(marker)))
                break
            start = pos + 1
    found.sort()
    reasons = {}
    for n, (pos, label, width) in enumerate(found):
        end = found[n + 1][0] - 2 if n + 1 < len(found) else len(body)
        text = body[pos + width:end]
        reasons[label] = re.sub(r"; \.\.\. and \d+ more$", "", text)
    return reasons


def rows_from_output(job: Job, output: dict, done: set) -> tuple[list[Row], list[Item]]:
    """Rows for a COMPLETED job (those not in ``done``) and the items it did not mention. An
    item is mentioned by any of its rows, one in ``done`` too (a zip whose members were all
    written before)."""
    entries = [(e, None) for e in output.get("captions", []) if isinstance(e, dict)]
    entries += [(e, str(e.get("error"))) for e in output.get("errors", []) if isinstance(e, dict)]
    mentioned: dict[int, list[Row]] = {}
    for entry, error in entries:
        label = str(entry.get("image_path", ""))
        item = job.labels.get(label)
        if item is not None:
            path = item.image_path
        else:
            item, path = _member(job, label)
            if item is None:
                continue
        row = Row(item, item.source, path, error=error)
        if error is None:
            row.caption = str(entry.get("caption", ""))
            if isinstance(entry.get("alternatives"), list):
                row.alternatives = [str(a) for a in entry["alternatives"]]
        rows_of_item = mentioned.setdefault(id(item), [])
        if row.key not in done:
            rows_of_item.append(row)
    rows = [r for item in job.items for r in mentioned.get(id(item), [])]
    return rows, [it for it in job.items if id(it) not in mentioned]


def answered_zips(job: Job, rows: Sequence[Row], missing: Sequence[Item]) -> list[str]:
    """The sources a COMPLETED job answered as zips (mentioned, but by member rows only): with
    this job's rows written, every member of each has its line."""
    own = {r.key for r in rows}
    gone = {id(it) for it in missing}
    return [it.source for it in job.items if id(it) not in gone and it.key not in own]


def _member(job: Job, label: str) -> tuple[Item | None, str]:
    """The zip a member's label belongs to, and the member's path. The worker names members
    bare when the job has one source (a zip source's ``data_url``, or a zip alone in its
    ``data_urls``), else ``<the source's label>/<member>`` (a zip inside a URL list)."""
    if len(job.items) == 1:
        return job.items[0], label
    for prefix, item in job.labels.items():
        if label.startswith(prefix + "/"):
            return item, label[len(prefix) + 1:]
    return None, ""
