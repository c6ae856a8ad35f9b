"""Where the images come from: each SOURCE the user gives, listed as the items of the run.

Sources (several may be given):
- a local folder: images chosen as ``caption_folder.py`` chooses them, sent inline as base64
  ``data:`` URIs. ``source`` = the file's path relative to its folder (prefixed by the folder as
  given when several folders are given);
- a URL list: ``.txt`` (one URL per line; blank lines and ``#`` comments skipped), ``.csv``
  with a ``url`` column, ``.jsonl`` with a ``url`` key. A line that is not an http(s) URL or
  data: URI is recorded as that image's error at once (sent, it would fail its whole job);
  a URL listed twice is captioned once;
- ``s3://bucket/prefix``: listed with boto3 (``BUCKET_ENDPOINT_URL`` / ``BUCKET_ACCESS_KEY_ID``
  / ``BUCKET_SECRET_ACCESS_KEY`` when set, else the standard AWS environment), image keys only,
  each sent as a presigned GET URL made when its job is submitted and valid 24 h (RunPod's
  default job TTL), so it outlives the job however long the run. ``source`` is
  ``s3://bucket/key``; the presigned URL is never written;
- an http(s) URL of one zip: one job with ``data_url``; each member becomes a line
  (``source`` = the URL, ``image_path`` = the member path).
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterable, Sequence

import schema
from caption_folder import IMAGE_EXTENSIONS, find_images
from deliver import CaptionNames
from text import short

from .work import Item

LIST_EXTENSIONS = (".txt", ".csv", ".jsonl")
URL_EXPIRY_S = 24 * 3600


class UsageError(Exception):
    """Bad flags, sources, settings or output: exit 2 with this message."""


def source_kind(text: str) -> str:
    lower = text.lower()
    if lower.startswith("s3://"):
        return "s3"
    if lower.startswith(("http://", "https://")):
        return "zip"
    if os.path.isdir(text):
        return "folder"
    if os.path.isfile(text) and os.path.splitext(lower)[1] in LIST_EXTENSIONS:
        return "list"
    if os.path.isfile(text):
        raise UsageError(f"{text}: a URL list must be .txt (one URL per line), .csv (a `url` "
                         "column) or .jsonl (a `url` key)")
    raise UsageError(f"{text}: not a folder, a URL list (.txt, .csv, .jsonl), an s3://bucket/"
                     "prefix or an http(s) URL of a zip")


def folder_items(root: str, prefix: str, fmt: str, out_dir: str) -> list[Item]:
    names = CaptionNames()
    items = []
    for parts in find_images(root):
        rel = "/".join(parts)
        path = os.path.join(root, *parts)
        name = f"{prefix}/{rel}" if prefix else rel
        item = Item(name, name, "file", path)
        if fmt == "txt":
            item.caption_file = os.path.join(root, *names.caption_file(parts[:-1], parts[-1]))
        if fmt == "hf":
            item.file_name = os.path.relpath(os.path.abspath(path), out_dir).replace(os.sep, "/")
        items.append(item)
    return items


def read_url_list(path: str) -> list[str]:
    """The URLs of a .txt / .csv / .jsonl list, in order."""
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8-sig", newline="") as fh:
        if ext == ".txt":
            return [s for line in fh if (s := line.strip()) and not s.startswith("#")]
        if ext == ".csv":
            reader = csv.DictReader(fh)
            if "url" not in (reader.fieldnames or []):
                raise UsageError(f"{path}: no `url` column (columns: "
                                 f"{', '.join(reader.fieldnames or []) or 'none'})")
            return [s for row in reader if (s := (row.get("url") or "").strip())]
        urls = []
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise UsageError(f"{path}:{n}: not a JSON object") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("url"), str):
                raise UsageError(f"{path}:{n}: each line needs a \"url\" string")
            urls.append(rec["url"].strip())
        return urls


def url_items(urls: Iterable[str]) -> list[Item]:
    items = []
    for url in urls:
        problem = schema.source_problem(url)
        if problem:
            items.append(Item(url, url, "bad", f"{problem}; use {schema.SOURCE_FORMS}"))
        else:
            items.append(Item(url, url, "url", url))
    return items


def s3_client():
    """boto3's S3 client: the worker's BUCKET_* settings when set, else the AWS environment."""
    import boto3
    from botocore.config import Config as BotoConfig
    kwargs: dict[str, Any] = {"config": BotoConfig(signature_version="s3v4")}
    env = os.environ
    if env.get("BUCKET_ENDPOINT_URL"):
        kwargs["endpoint_url"] = env["BUCKET_ENDPOINT_URL"]
    if env.get("BUCKET_ACCESS_KEY_ID") and env.get("BUCKET_SECRET_ACCESS_KEY"):
        kwargs["aws_access_key_id"] = env["BUCKET_ACCESS_KEY_ID"]
        kwargs["aws_secret_access_key"] = env["BUCKET_SECRET_ACCESS_KEY"]
    if not (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
        kwargs["region_name"] = "us-east-1"
    return boto3.client("s3", **kwargs)


def s3_items(uri: str, client) -> list[Item]:
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise UsageError(f"{uri}: give s3://bucket or s3://bucket/prefix")
    items = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                     Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                parts = key.split("/")
                if any(p.startswith(".") or p == "__MACOSX" for p in parts):
                    continue
                if os.path.splitext(key)[1].lower() in IMAGE_EXTENSIONS:
                    name = f"s3://{bucket}/{key}"
                    items.append(Item(name, name, "s3", key, bucket=bucket))
    except Exception as exc:  # noqa: BLE001 - botocore raises many types
        raise UsageError(f"{uri}: could not list the bucket ({type(exc).__name__}: "
                         f"{short(str(exc), 200)}); check BUCKET_ENDPOINT_URL / the AWS "
                         "settings and credentials") from None
    return items


def presigned_url(client, item: Item) -> str:
    """The GET URL sent for an s3 item: made when its job is submitted, valid ``URL_EXPIRY_S``
    (why: the s3:// paragraph above)."""
    return client.generate_presigned_url(
        "get_object", Params={"Bucket": item.bucket, "Key": item.ref},
        ExpiresIn=URL_EXPIRY_S)


def plan_items(sources: Sequence[str], fmt: str, out: str, s3=None) -> tuple[list[Item], int]:
    """Every item of the sources (duplicates dropped) and how many duplicates there were."""
    kinds = [source_kind(s) for s in sources]
    out_dir = os.path.dirname(os.path.abspath(out))
    if fmt in ("hf", "txt"):
        for s, kind in zip(sources, kinds):
            if kind != "folder":
                raise UsageError(f"--format {fmt} writes beside local images: {s} is not a "
                                 "folder; use --format jsonl or csv for URL lists, s3:// and "
                                 "zip sources")
            if fmt == "hf" and os.path.relpath(os.path.abspath(s), out_dir).startswith(".."):
                raise UsageError(f"--format hf: {s} is not inside {out_dir or '.'}, the folder "
                                 "of --out (metadata.jsonl names images relative to its own "
                                 "folder); put --out at FOLDER/metadata.jsonl")
    folders = sum(k == "folder" for k in kinds)
    items: list[Item] = []
    for s, kind in zip(sources, kinds):
        if kind == "folder":
            prefix = os.path.normpath(s).replace(os.sep, "/") if folders > 1 else ""
            items += folder_items(s, prefix, fmt, out_dir)
        elif kind == "list":
            items += url_items(read_url_list(s))
        elif kind == "s3":
            items += s3_items(s, s3 if s3 is not None else s3_client())
        else:
            items.append(Item(s, s, "zip", s))
    unique: dict[tuple[str, str], Item] = {}
    for item in items:
        unique.setdefault(item.key, item)
    return list(unique.values()), len(items) - len(unique)
