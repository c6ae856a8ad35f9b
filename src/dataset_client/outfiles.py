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
atomically without their lines, so each image still ends as exactly one line. A zip source is
skipped when it has lines and they are not the file's last block (only the last block can have
been cut); otherwise it runs again and only members not yet written are added. Jobs in flight at
a kill may run twice on the endpoint; the output never holds an image twice.
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
        """Replace the file atomically (temporary file, fsync, rename)."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8", errors="backslashreplace", newline="") as fh:
                fh.write(self.header() + self.encode(records))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

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


class Output:
    """One format's files: what is already there (resume) and appending a job's rows."""

    def __init__(self, fmt: str, path: str, items: Sequence[Item]):
        self.fmt = fmt
        self.path = path
        self.main = LineFile(path, "csv" if fmt == "csv" else "jsonl")
        stem = os.path.splitext(path)[0]
        self.errors = LineFile(f"{stem}.errors.jsonl") if fmt == "hf" else None
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
        last = (self.records or [None])[-1]
        existing.tail_source = self.key_of(last)[0] if last and self.key_of(last) else None
        existing.failed -= existing.done
        return existing

    def forget(self, keys: set) -> None:
        """Rewrite the files without the error lines of ``keys`` (they are being retried)."""
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
    tail_source: str | None = None  # the source of the file's last line
    torn: int = 0
