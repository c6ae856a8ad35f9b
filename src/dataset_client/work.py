"""The records the client's parts hand each other: an image of the dataset (``Item``), what is
sent for it (``Prepared``), a job (``Job``) and what its thread learned (``Result``), and one
output line (``Row``)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Item:
    """One image of the dataset (or one zip source)."""
    source: str  # what the output calls it
    image_path: str
    kind: str  # "file" | "url" | "s3" | "zip" | "bad" (a list line that is not a source)
    ref: str  # the file's path, the URL, the object key, or the problem ("bad")
    bucket: str = ""
    caption_file: str = ""  # txt format: where its caption goes
    file_name: str = ""  # hf format: relative to the folder of --out

    @property
    def key(self) -> tuple[str, str]:
        return self.source, self.image_path


@dataclass
class Prepared:
    """What goes into ``data_urls`` for one item, and what it cost."""
    entry: str  # the URL or data: URI
    entry_bytes: int  # len(json.dumps(entry)): its share of the body
    raw_bytes: int = 0  # the file's size (inline items)
    data_bytes: int = 0  # the bytes actually encoded (pre-resized or raw)
    preresized: bool = False
    error: str | None = None  # cannot be sent at all


@dataclass
class Row:
    """One output line: an image's caption or its error."""
    item: Item
    source: str
    image_path: str
    caption: str | None = None
    alternatives: list[str] | None = None
    error: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.source, self.image_path


@dataclass
class Job:
    items: list[Item]
    input: dict
    body_bytes: int
    labels: dict[str, Item]  # the worker's image_path of each item
    raw_bytes: int = 0
    data_bytes: int = 0
    preresized: int = 0

    @property
    def zip(self) -> bool:
        return len(self.items) == 1 and self.items[0].kind == "zip"


@dataclass
class Result:
    """What a job thread learned: a final state, a lost job, or nothing (stopped)."""
    kind: str  # "state" | "lost" | "rejected" | "stopped"
    state: dict = field(default_factory=dict)
    reason: str = ""
