"""Real zips, written by ``zipfile`` (and patched byte by byte where zipfile refuses, e.g. the
encryption flag).

``make_zip(entries)`` with entries ``(name or ZipInfo, bytes)``; ``symlink_entry``,
``patch_entry`` (flags, sizes, CRC in the central directory and local header), ``corrupt_entry``
(damage compressed data), ``zip_bomb``, ``many_members_zip``, ``truncated``; name lists
``JUNK_NAMES`` and ``ZIP_SLIP_NAMES``. ``five_member_zip()``: the zip the job tests share
(4 captions, 1 error, 1 skipped).
"""
from __future__ import annotations

import functools
import io
import stat
import struct
import zipfile
from typing import Iterable, Iterator

from support import images as pics


JUNK_NAMES = ("__MACOSX/._a.jpg", ".DS_Store", "dir/.hidden.jpg", ".git/config", "notes.txt")
ZIP_SLIP_NAMES = ("../../x.jpg", "/abs/x.jpg", "back\\slash.jpg")

Entry = tuple["str | zipfile.ZipInfo", bytes]


def make_zip(entries: Iterable[Entry], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A real zip of ``(name or ZipInfo, data)`` entries; names are kept verbatim."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries:
            if isinstance(name, str):  # a ZipInfo keeps its own settings
                name = zipfile.ZipInfo(name)
                name.compress_type = compression
            zf.writestr(name, data)
    return buf.getvalue()


def symlink_entry(name: str, target: str = "/etc/passwd") -> Entry:
    """A unix symlink member (S_IFLNK in external_attr), as ``zip --symlinks`` writes it."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def _central_entries(data: bytes) -> Iterator[tuple[int, str]]:
    """(offset, name) of each central directory entry, walked from the end record."""
    end = data.rindex(b"PK\x05\x06")
    count, _, offset = struct.unpack("<HII", data[end + 10:end + 20])
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[offset + 28:offset + 34])
        yield offset, data[offset + 46:offset + 46 + name_len].decode("utf-8", "replace")
        offset += 46 + name_len + extra_len + comment_len


# field -> (offset in the central entry, offset in the local header or None, struct format)
_FIELDS = {"flag_bits": (8, 6, "<H"), "crc": (16, 14, "<I"), "compress_size": (20, 18, "<I"),
           "file_size": (24, 22, "<I"), "external_attr": (38, None, "<I")}


def patch_entry(data: bytes, name: str, **fields: int) -> bytes:
    """Overwrite header fields of member ``name`` (flag_bits, crc, compress_size, file_size,
    external_attr) in the central directory and the local header, e.g. ``flag_bits=1`` marks
    it encrypted (zipfile cannot encrypt) and ``file_size=10`` makes its header lie."""
    out = bytearray(data)
    for offset, entry_name in _central_entries(data):
        if entry_name != name:
            continue
        local = struct.unpack("<I", data[offset + 42:offset + 46])[0]
        for field, value in fields.items():
            central_at, local_at, fmt = _FIELDS[field]
            struct.pack_into(fmt, out, offset + central_at, value)
            if local_at is not None:
                struct.pack_into(fmt, out, local + local_at, value)
    return bytes(out)


def corrupt_entry(data: bytes, name: str) -> bytes:
    """Damage the compressed data of member ``name`` (header intact): reading it fails."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(name)
    local = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[local + 26:local + 30])
    start = local + 30 + name_len + extra_len
    out = bytearray(data)
    for k in range(start + 2, start + min(info.compress_size, 64)):
        out[k] ^= 0x5A
    return bytes(out)


@functools.lru_cache(maxsize=None)
def zip_bomb(size: int = 50 * 1024 * 1024) -> bytes:
    """An ordinary image (``photo.png``), then the bomb: a member of ``size`` zero bytes,
    deflated at level 9 (ratio about 1000:1). The bomb is not the first member, so a guard
    that looked at the first member only would let it through."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("photo.png", pics.png(seed=1))
        with zf.open("zeros.jpg", "w") as member:
            block = bytes(1 << 20)
            for _ in range(size >> 20):
                member.write(block)
    return buf.getvalue()


def many_members_zip(count: int, data: bytes = b"x") -> bytes:
    """``count`` tiny members named img00000.jpg, ... (only the count matters)."""
    return make_zip((f"img{i:05d}.jpg", data) for i in range(count))


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def five_member_zip():
    """Nested folder, one corrupt member, one .txt: 4 captions + 1 error + 1 skipped."""
    data = make_zip([
        ("b/second.png", pics.png(seed=2)),
        ("a/first.jpg", pics.jpeg(seed=1)),
        ("a/deeper/third.webp", pics.image_bytes("WEBP", seed=3)),
        ("c/broken.jpg", pics.jpeg(seed=4, size=(256, 192))),
        ("readme.txt", b"not an image"),
        ("z/fourth.gif", pics.image_bytes("GIF", seed=5)),
    ])
    return corrupt_entry(data, "c/broken.jpg")
