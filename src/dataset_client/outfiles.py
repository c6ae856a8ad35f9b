"""The output files: each format's lines appended job by job, and what an earlier run left there
(resume).

Output (``--out``, ``--format``), appended and flushed (and fsynced) after each job:
- ``jsonl``: ``{"source", "image_path", "caption", "alternatives"?}`` or ``{"source",
  "image_path", "error"}``;
- ``csv``: ``source,image_path,caption,error`` (the best caption only);
- ``hf``: ``FOLDER/metadata.jsonl`` with ``file_name`` (relative to the folder of ``--out``) and
  ``text``, successes only, as ``datasets``' imagefolder reads it; failures go to
  ``<stem>.errors.jsonl`` beside it (imagefolder ignores it). Sources must be folders inside
  the folder of ``--out``;
- ``txt``: ``<stem>.txt`` beside each image, named as ``caption_folder.py`` names them (a file is
  written whole), and ``--out`` holds the run's record as JSON lines (with ``caption_file``).
  Sources must be folders.

Resume (every format): on start the existing output is read (for ``txt``, the record), a torn
last line (a kill mid-write) is dropped, and images already there are skipped; with
``--retry-failed`` those recorded with an error are retried: the file is first rewritten
atomically without their lines, so each image still ends as exactly one line. A zip (a zip
source, or a URL of a list that is one) is skipped only when ``<out>.zips.json`` lists it
complete: it is added there (replaced atomically, fsynced) once the zip's whole block is flushed,
and taken out before ``--retry-failed`` rewrites its error lines. A zip not listed (a kill cut
its block, wherever its lines are now) runs again and only members not yet written are added;
with ``--retry-failed`` a zip with error lines runs again. Jobs in flight at a kill may run twice
on the endpoint; the output never holds an image twice.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from caption_folder import write_caption
from deliver import caption_text

from .work import Item, Row

FORMATS = ("jsonl", "csv", "hf", "txt")
CSV_FIELDS = ("source", "image_path", "caption", "error")


class OutputError(Exception):
    """--out holds something this tool did not write."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_file(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temporary file, fsync, rename, fsync the
    folder): a kill leaves the old file or the new one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def parse_jsonl(data: bytes, name: str) -> tuple[list[dict], int]:
    """Records of complete lines and the bytes they span (a torn last line is left out)."""
    end = data.rfind(b"\n") + 1
    records = []
    for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise OutputError(f"{name}: line {n} is not JSON; give --out a file this tool "
                              "wrote, or a new one") from None
        if not isinstance(rec, dict):
            raise OutputError(f"{name}: line {n} is not a JSON object")
        records.append(rec)
    return records, end


def parse_csv(data: bytes, name: str) -> tuple[list[dict], int]:
    """CSV records (header first) and the bytes they span: a record ends at a newline outside
    quotes, so a torn record (or a newline inside a quoted caption) is never taken as whole."""
    good = quotes = start = 0
    while (nl := data.find(b"\n", start)) >= 0:
        quotes += data.count(b'"', start, nl)
        start = nl + 1
        if quotes % 2 == 0:
            good = start
    text = data[:good].decode("utf-8", "replace")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return [], good
    if tuple(rows[0]) != CSV_FIELDS:
        raise OutputError(f"{name}: its header is not {','.join(CSV_FIELDS)}; give --out a "
                          "file this tool wrote, or a new one")
    records = []
    for n, row in enumerate(rows[1:], 2):
        if len(row) != len(CSV_FIELDS):
            raise OutputError(f"{name}: record {n} has {len(row)} columns, not 4")
        records.append(dict(zip(CSV_FIELDS, row)))
    return records, good


class LineFile:
    """An append-only file of records (JSON lines or CSV), written whole job by job."""

    def __init__(self, path: str, kind: str = "jsonl"):
        self.path = path
        self.kind = kind
        self.torn = 0  # bytes of a torn last line dropped at load

    def encode(self, records: Iterable[dict]) -> str:
        if self.kind == "jsonl":
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, lineterminator="\n")
        for r in records:
            writer.writerow([r.get(k) or "" for k in CSV_FIELDS])
        return buf.getvalue()

    def header(self) -> str:
        return ",".join(CSV_FIELDS) + "\n" if self.kind == "csv" else ""

    def load(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return []
        parse = parse_jsonl if self.kind == "jsonl" else parse_csv
        records, good = parse(data, self.path)
        if good < len(data):
            self.torn = len(data) - good
            with open(self.path, "r+b") as fh:  # a kill mid-write: drop the torn tail
                fh.truncate(good)
                fh.flush()
                os.fsync(fh.fileno())
        return records

    def rewrite(self, records: Sequence[dict]) -> None:
        replace_file(self.path, self.header() + self.encode(records))

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        text = (self.header() if new else "") + self.encode(records)
        data = text.encode("utf-8", "backslashreplace")  # a lone surrogate stays a JSON escape
        with open(self.path, "ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


class ZipState:
    """``<out>.zips.json``, ``{"complete": [source, ...]}``: the zips whose every member has its
    line in --out. Unreadable or missing, it lists none: every zip with lines runs again, which
    adds only the members not yet written."""

    def __init__(self, path: str):
        self.path = f"{path}.zips.json"
        self.complete: set[str] = set()

    def load(self) -> set[str]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                listed = json.load(fh).get("complete", [])
            self.complete = {s for s in listed if isinstance(s, str)}
        except (OSError, ValueError, AttributeError, TypeError):
            self.complete = set()
        return set(self.complete)

    def update(self, add: Iterable[str] = (), drop: Iterable[str] = ()) -> None:
        new = (self.complete | set(add)) - set(drop)
        if new != self.complete:
            replace_file(self.path, json.dumps({"complete": sorted(new)}, ensure_ascii=False))
            self.complete = new


class Output:
    """One format's files: what is already there (resume) and appending a job's rows."""

    def __init__(self, fmt: str, path: str, items: Sequence[Item]):
        self.fmt = fmt
        self.path = path
        self.main = LineFile(path, "csv" if fmt == "csv" else "jsonl")
        stem = os.path.splitext(path)[0]
        self.errors = LineFile(f"{stem}.errors.jsonl") if fmt == "hf" else None
        self.zips = ZipState(path)
        self._by_file = {it.file_name: it.key for it in items if it.file_name}
        self._record_dir = os.path.dirname(os.path.abspath(path))
        self.records: list[dict] = []
        self.error_records: list[dict] = []

    def key_of(self, rec: dict) -> tuple[str, str] | None:
        if self.fmt == "hf":
            if "source" in rec:
                return str(rec["source"]), str(rec.get("image_path", ""))
            return self._by_file.get(str(rec.get("file_name")))
        return str(rec.get("source", "")), str(rec.get("image_path", ""))

    @staticmethod
    def is_error(rec: dict) -> bool:
        return bool(rec.get("error"))

    def load(self) -> "Existing":
        self.records = self.main.load()
        self.error_records = self.errors.load() if self.errors else []
        existing = Existing(torn=self.main.torn + (self.errors.torn if self.errors else 0))
        for rec in self.records + self.error_records:
            key = self.key_of(rec)
            if key is None:
                continue
            (existing.failed if self.is_error(rec) else existing.done).add(key)
            existing.sources.add(key[0])
        existing.complete = self.zips.load() & existing.sources  # (--out replaced: none)
        existing.failed -= existing.done
        return existing

    def mark_complete(self, sources: Iterable[str]) -> None:
        """List these zips complete: call once their whole block is flushed."""
        self.zips.update(add=sources)

    def forget(self, keys: set) -> None:
        """Rewrite the files without the error lines of ``keys`` (they are being retried); their
        zips are first taken off the complete list, so a kill in between loses no member."""
        self.zips.update(drop={k[0] for k in keys})
        def keep(recs):
            return [r for r in recs if not (self.is_error(r) and self.key_of(r) in keys)]
        kept = keep(self.records)
        if len(kept) != len(self.records):
            self.main.rewrite(kept)
            self.records = kept
        if self.errors is not None:
            kept = keep(self.error_records)
            if len(kept) != len(self.error_records):
                self.errors.rewrite(kept)
                self.error_records = kept

    def write(self, rows: Sequence[Row]) -> list[Row]:
        """Append one job's rows; return them (a txt row whose file cannot be written becomes
        an error row)."""
        if self.fmt == "hf":
            self.main.append([{"file_name": r.item.file_name, "text": r.caption}
                              for r in rows if r.error is None])
            assert self.errors is not None
            self.errors.append([{"file_name": r.item.file_name, "source": r.source,
                                 "image_path": r.image_path, "error": r.error}
                                for r in rows if r.error is not None])
            return list(rows)
        if self.fmt == "txt":
            for r in rows:
                if r.error is None:
                    try:
                        write_caption(r.item.caption_file,
                                      caption_text([r.caption or "", *(r.alternatives or [])]))
                    except OSError as exc:
                        r.error = (f"could not write {os.path.basename(r.item.caption_file)}: "
                                   f"{exc.strerror or exc}")
                        r.caption = r.alternatives = None
        recs = []
        for r in rows:
            rec: dict[str, Any] = {"source": r.source, "image_path": r.image_path}
            if self.fmt == "txt" and r.error is None:
                rec["caption_file"] = os.path.relpath(r.item.caption_file,
                                                      self._record_dir).replace(os.sep, "/")
            if r.error is None:
                rec["caption"] = r.caption
                if r.alternatives is not None and self.fmt != "csv":
                    rec["alternatives"] = r.alternatives
            else:
                rec["error"] = r.error
            recs.append(rec)
        self.main.append(recs)
        return list(rows)


@dataclass
class Existing:
    done: set = field(default_factory=set)  # keys captioned
    failed: set = field(default_factory=set)  # keys recorded with an error
    sources: set = field(default_factory=set)  # sources with any line (zips)
    complete: set = field(default_factory=set)  # zips with every member's line (<out>.zips.json)
    torn: int = 0
