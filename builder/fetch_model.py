"""Download a BLIP-2 checkpoint once and store it as fp16 safetensors for the worker.

    python builder/fetch_model.py                                   # Salesforce/blip2-opt-2.7b-coco
    python builder/fetch_model.py --model REPO_ID --out DIR [--revision REV] [--keep-staging]
    python builder/fetch_model.py --upgrade DIR                     # pre-2024 layout, in place
    python builder/fetch_model.py --engine lavis [--cache-dir DIR]  # LAVIS checkpoints instead

Run at Docker build time (one RUN layer: download, convert, delete) and by users; then point
the worker at the result with ``BLIP_MODEL=DIR``.

Steps (``--engine transformers``, the default):

1. ``DIR/fetch_manifest.json`` lists a completed conversion whose files are all there with their
   sizes: print "already present", upgrade its layout in place if it is old (step 6), and exit
   0 (no network).
2. List the repo (huggingface_hub ``snapshot_download(dry_run=True)``): file sizes and the commit.
3. Check free disk space (fp32 download + fp16 output + a margin) and refuse with the numbers.
4. Download that commit into a staging dir (``DIR.fp32-download``; huggingface_hub resumes
   partial files). Only configs, tokenizer files and ``*.safetensors``: no ``*.bin`` duplicate.
5. Convert shard by shard, one tensor at a time, so memory follows the largest tensor, not a
   shard (measured on the real architecture, 10 + 5 GB fp32 shards: 1.3 GB peak anonymous
   memory, 20 s; the source shard is memory-mapped, so page cache grows too, but it is
   reclaimable). Floating tensors become float16, except those transformers keeps in float32
   when it loads the model in float16 (``_keep_in_fp32_modules``: for BLIP-2 ``query_tokens``
   and ``qformer``), which stay float32, so loading the result loses nothing that loading the
   fp32 repo in fp16 would keep. Every file is written under ``NAME.partial`` and renamed when
   complete; a rerun keeps finished shards and rewrites the rest. Tokenizer/processor/config
   files are copied; ``config.json`` says ``float16``.
6. Upgrade a checkpoint saved in the BLIP-2 layout from before late 2024 (older Hub revisions,
   forks saved with an older transformers): see "Layout upgrade" below. What cannot be upgraded
   is refused right after the download, before the conversion.
7. Verify without loading the weights: transformers reads the config and the index, and every
   shard's names, shapes and dtypes match the index and the dtype policy. Then write the
   manifest, print sizes and delete the staging dir (unless ``--keep-staging``).

Layout upgrade. In late 2024 Hugging Face changed the BLIP-2 repos (the transformers PR #34876
era, so that transformers could drop its legacy code path): the tokenizer gained an ``<image>``
token (OPT: id 50265, right after the 50265 base tokens, in an embedding table with spare rows),
``config.json`` gained ``image_token_index`` and the processor config ``num_query_tokens``.
Without them the worker refuses the checkpoint. The upgrade adds ``<image>`` (special, not
normalised) at the first id after the tokenizer's tokens, which must be a row the embedding
table already has (its row count is read off the safetensors header, no weights loaded): the
weights stay as they are (BLIP-2 writes the query outputs where ``<image>`` stands, so that row
is never read as input). It sets the two config keys, checks the result by loading the
tokenizer and config with transformers, and records what it added in the manifest
(``"upgraded"``). It refuses, saying why, a checkpoint whose tokenizer already uses every row,
whose ``<image>`` id contradicts ``image_token_index``, whose ``num_query_tokens`` is not 32,
whose tokenizer splits "\\n", or which is not BLIP-2. ``--upgrade DIR`` does this in place to a
local directory (no network; idempotent; DIR's manifest, if any, is updated, else
``layout_upgrade.json`` records it), as does a rerun of the fetch into a directory fetched
before this step existed.

``HF_TOKEN`` is used when set (the default repo is public). Exit status: 0 done or already
present, 1 a clear error on stderr (what is wrong and what to do), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch

DEFAULT_REPO = "Salesforce/blip2-opt-2.7b-coco"
DEFAULT_OUT = Path("models/blip2-opt-2.7b-coco")
SRC_DIR = Path(__file__).resolve().parents[1] / "src"

MANIFEST = "fetch_manifest.json"
PENDING = ".fetch_pending.json"  # names the model of an unfinished fetch into this dir
INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG = "config.json"
PARTIAL = ".partial"
STAGING_SUFFIX = ".fp32-download"
HUB_CACHE = ".hub-cache"  # inside the staging dir, so it goes when the staging dir goes
# Configs, tokenizer/processor files (json, merges.txt, sentencepiece *.model) and safetensors;
# not the index of the pickled *.bin duplicate.
ALLOW_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]
IGNORE_PATTERNS = ["*.bin.index.json"]

GB = 10**9  # decimal GB, as the Hub shows file sizes
MARGIN_BYTES = 1 * GB
# fp16 output / fp32 weights, before the download tells us the dtypes: half, plus headroom for
# the modules kept in float32 (about 3% of BLIP-2's parameters).
FP16_OUTPUT_FRACTION = 0.55

TARGET_DTYPE = torch.float16
KEPT_DTYPE = torch.float32
# safetensors header dtype codes this tool reads and writes.
DTYPE_CODES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}


class FetchError(RuntimeError):
    """The model cannot be fetched or converted; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fetch_model.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("transformers", "lavis"), default="transformers",
                   help="transformers: download + fp16 conversion (default); lavis: pre-download "
                        "the LAVIS checkpoints with src/engines/lavis_checkpoints.py")
    p.add_argument("--model", default=None, help=f"Hub repo id (default {DEFAULT_REPO})")
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit (default: main); older revisions are upgraded to "
                        "the current BLIP-2 layout")
    p.add_argument("--out", type=Path, default=None,
                   help=f"directory of the fp16 model (default {DEFAULT_OUT})")
    p.add_argument("--upgrade", type=Path, default=None, metavar="DIR",
                   help="upgrade the local model directory DIR in place from the pre-2024 BLIP-2 "
                        "layout (adds the <image> token and image_token_index); no network")
    p.add_argument("--staging", type=Path, default=None,
                   help=f"fp32 download directory (default: OUT{STAGING_SUFFIX})")
    p.add_argument("--keep-staging", action="store_true",
                   help="keep the fp32 download (deleted by default)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="--engine lavis only: where the LAVIS checkpoints go")
    args = p.parse_args(argv)
    if args.upgrade is not None:
        given = [flag for flag, value in (("--engine lavis", args.engine == "lavis"),
                                          ("--model", args.model), ("--revision", args.revision),
                                          ("--out", args.out), ("--staging", args.staging),
                                          ("--keep-staging", args.keep_staging),
                                          ("--cache-dir", args.cache_dir)) if value]
        if given:
            p.error(f"--upgrade DIR works on DIR alone; drop {', '.join(given)}")
    if args.model is None:
        args.model = DEFAULT_REPO
    if args.out is None:
        args.out = DEFAULT_OUT
    if args.staging is None:
        args.staging = staging_dir_for(args.out)
    if args.staging.resolve() == args.out.resolve():
        p.error("--staging must differ from --out (the staging dir is deleted at the end)")
    return args


def staging_dir_for(out: Path) -> Path:
    return out.with_name(out.name + STAGING_SUFFIX)


def hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


# ----------------------------------------------------------------------------------------------
# disk space
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskNeed:
    directory: Path
    need: int  # bytes that must be free
    detail: str  # what the bytes are for


def gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent (the filesystem a new dir will live on)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def same_filesystem(a: Path, b: Path) -> bool:
    return existing_ancestor(a).stat().st_dev == existing_ancestor(b).stat().st_dev


def disk_needs(staging: Path, out: Path, download_bytes: int, weight_bytes: int,
               same_fs: bool, margin: int = MARGIN_BYTES) -> list[DiskNeed]:
    """What must be free where: the files still to download in ``staging`` and the fp16 output
    (estimated from the fp32 weights) in ``out``, each with a margin; one need if both dirs
    share a filesystem. Partly downloaded files count in full (conservative)."""
    output = int(weight_bytes * FP16_OUTPUT_FRACTION)
    dl = f"{gb(download_bytes)} download"
    conv = f"{gb(output)} fp16 output"
    extra = f"{gb(margin)} margin"
    if same_fs:
        return [DiskNeed(out, download_bytes + output + margin, f"{dl} + {conv} + {extra}")]
    return [DiskNeed(staging, download_bytes + margin, f"{dl} + {extra}"),
            DiskNeed(out, output + margin, f"{conv} + {extra}")]


def check_disk(needs: Iterable[DiskNeed]) -> None:
    for n in needs:
        free = shutil.disk_usage(existing_ancestor(n.directory)).free
        if free < n.need:
            raise FetchError(
                f"not enough disk space: need {gb(n.need)} free in {n.directory} ({n.detail}), "
                f"have {gb(free)}. Free some space or point --out / --staging at a larger disk "
                "(on Docker: raise the builder's disk limit).")


# ----------------------------------------------------------------------------------------------
# dtype policy
# ----------------------------------------------------------------------------------------------
def keep_fp32_pattern(modules: Iterable[str]) -> re.Pattern | None:
    """The names transformers keeps in float32, matched as transformers matches them: each
    module name is a glob searched anywhere in the parameter name (``build_glob_alternation``)."""
    globs = sorted(set(modules))
    if not globs:
        return None
    return re.compile("|".join(f"(?:{g.replace('*', '.*')})" for g in globs))


def target_dtype(name: str, dtype: torch.dtype, keep: re.Pattern | None) -> torch.dtype:
    """float16 for floating tensors, float32 for those ``keep`` matches; others unchanged."""
    if not dtype.is_floating_point:
        return dtype
    if keep is not None and keep.search(name):
        return KEPT_DTYPE
    return TARGET_DTYPE


def keep_fp32_modules(model_dir: Path) -> list[str]:
    """``_keep_in_fp32_modules`` (+ ``_strict``) of the architecture in ``model_dir/config.json``,
    read off a model built on the meta device, where transformers also gathers its submodules'
    lists (as ``from_pretrained`` does before it casts)."""
    import transformers
    config = transformers.AutoConfig.from_pretrained(model_dir)
    arch = (getattr(config, "architectures", None) or ["Blip2ForConditionalGeneration"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise FetchError(f"{model_dir}/config.json names architecture {arch!r}, which transformers "
                         f"{transformers.__version__} does not have; upgrade transformers")
    with torch.device("meta"):
        model = cls(config)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return sorted(keep | set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()))


# ----------------------------------------------------------------------------------------------
# safetensors headers and streaming shard conversion
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    src_dtype: torch.dtype
    dtype: torch.dtype  # in the output

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


def read_header(path: Path) -> tuple[int, dict]:
    """(header length, header dict) of a safetensors file, without reading tensor data."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length)) if length <= 100_000_000 else None
    if not isinstance(header, dict):
        raise ValueError(f"{path} does not look like a safetensors file")
    return length, header


def shard_plan(path: Path, keep: re.Pattern | None) -> tuple[list[TensorPlan], dict]:
    """The output tensors of one source shard (in file order) and its ``__metadata__``."""
    _, header = read_header(path)
    metadata = dict(header.pop("__metadata__", None) or {})
    plan = []
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if info["dtype"] not in DTYPE_CODES:
            raise FetchError(f"{path.name}: tensor {name} has dtype {info['dtype']}, which this "
                             "tool does not convert")
        src = DTYPE_CODES[info["dtype"]]
        plan.append(TensorPlan(name, tuple(info["shape"]), src, target_dtype(name, src, keep)))
    return plan, metadata


def encode_header(plan: list[TensorPlan], metadata: dict) -> bytes:
    """A safetensors header for ``plan`` in order: 8-byte length, JSON padded to 8 bytes."""
    header: dict = {"__metadata__": {**metadata, "format": "pt"}}
    offset = 0
    for t in plan:
        header[t.name] = {"dtype": CODE_OF[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` via ``path.partial`` (truncating any half-written leftover), fsync, rename."""
    tmp = path.with_name(path.name + PARTIAL)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cast_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = tensor.to(dtype).contiguous()
    if out.is_floating_point() and not bool(torch.isfinite(out).all()) \
            and bool(torch.isfinite(tensor).all()):
        raise FetchError(f"tensor {name} has values outside the float16 range; this checkpoint "
                         "cannot be stored in float16 (use the fp32 repo directly)")
    return out


def write_shard(src: Path, dst: Path, plan: list[TensorPlan], metadata: dict) -> None:
    """Stream ``src`` into ``dst`` one tensor at a time, cast per ``plan``."""
    from safetensors import safe_open

    def write(f: BinaryIO) -> None:
        f.write(encode_header(plan, metadata))
        with safe_open(str(src), framework="pt") as reader:
            for t in plan:
                data = cast_tensor(t.name, reader.get_tensor(t.name), t.dtype)
                f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
                del data

    atomic_write(dst, write)


def shard_is_complete(path: Path, plan: list[TensorPlan]) -> bool:
    """``path`` holds exactly ``plan``'s tensors (names, shapes, dtypes) and all their bytes."""
    try:
        length, header = read_header(path)
        size = path.stat().st_size
    except (OSError, ValueError, struct.error):
        return False
    header.pop("__metadata__", None)
    want = {t.name: (CODE_OF[t.dtype], list(t.shape)) for t in plan}
    have = {n: (i.get("dtype"), i.get("shape")) for n, i in header.items()}
    return have == want and size == 8 + length + sum(t.nbytes for t in plan)


# ----------------------------------------------------------------------------------------------
# checkpoint conversion
# ----------------------------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def source_shards(src: Path) -> tuple[list[str], dict | None]:
    """Shard file names of the safetensors checkpoint in ``src`` and its index (None if a
    single ``model.safetensors``)."""
    if (src / INDEX).is_file():
        index = read_json(src / INDEX)
        return sorted(set(index["weight_map"].values())), index
    if (src / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    raise FetchError(f"no safetensors weights in {src} (expected {INDEX} or {SINGLE_FILE}); "
                     "this tool converts safetensors checkpoints only")


def side_files(src: Path) -> list[Path]:
    """Top-level files to copy as they are (configs, tokenizer, processor): not weights, weight
    indexes or leftovers."""
    return sorted(p for p in src.iterdir() if p.is_file()
                  and not p.name.endswith(WEIGHT_SUFFIXES + (".index.json", PARTIAL)))


def copy_side_file(path: Path, out: Path) -> None:
    if path.name == CONFIG:  # the config describes the stored weights: now float16
        config = read_json(path)
        config["dtype"] = "float16"
        if "torch_dtype" in config:  # older transformers read this key
            config["torch_dtype"] = "float16"
        atomic_write(out / CONFIG, lambda f: f.write(json_bytes(config)))
        return
    with open(path, "rb") as src:
        atomic_write(out / path.name, lambda f: shutil.copyfileobj(src, f, 16 * 2**20))


def index_for(plans: dict[str, list[TensorPlan]], src_index: dict) -> dict:
    """The output index: same tensor -> shard map as the source, total_size of the fp16 data."""
    weight_map = {t.name: shard for shard, plan in plans.items() for t in plan}
    if weight_map != src_index["weight_map"]:
        raise FetchError(f"the source {INDEX} does not match its shards' contents; delete the "
                         "staging dir and download again")
    metadata = {**src_index.get("metadata", {}),
                "total_size": sum(t.nbytes for plan in plans.values() for t in plan)}
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


def convert_checkpoint(src: Path, out: Path, keep_modules: Iterable[str],
                       log: Callable[[str], None] = print) -> dict[str, list[TensorPlan]]:
    """Convert the safetensors checkpoint in ``src`` into ``out`` (see the module docstring).
    Resumable: shards already complete in ``out`` are kept. Returns the plan of every shard."""
    keep = keep_fp32_pattern(keep_modules)
    shards, src_index = source_shards(src)
    out.mkdir(parents=True, exist_ok=True)
    plans: dict[str, list[TensorPlan]] = {}
    for i, shard in enumerate(shards, 1):
        plan, metadata = shard_plan(src / shard, keep)
        plans[shard] = plan
        size = gb(sum(t.nbytes for t in plan))
        if shard_is_complete(out / shard, plan):
            log(f"[{i}/{len(shards)}] {shard}: already converted ({size})")
            continue
        log(f"[{i}/{len(shards)}] {shard}: {gb((src / shard).stat().st_size)} -> {size}")
        write_shard(src / shard, out / shard, plan, metadata)
    if src_index is not None:
        index = index_for(plans, src_index)
        atomic_write(out / INDEX, lambda f: f.write(json_bytes(index)))
    for path in side_files(src):
        copy_side_file(path, out)
    for leftover in out.glob("*" + PARTIAL):
        leftover.unlink()
    return plans


# ----------------------------------------------------------------------------------------------
# verification (no weights loaded)
# ----------------------------------------------------------------------------------------------
def verify_output(out: Path, plans: dict[str, list[TensorPlan]]) -> None:
    """transformers reads the config and the index; safetensors reads every shard, whose
    names, shapes and dtypes match the plan and the index. Raises FetchError."""
    import transformers
    from safetensors import safe_open
    from transformers.utils.hub import get_checkpoint_shard_files

    try:
        transformers.AutoConfig.from_pretrained(out)
        if (out / INDEX).is_file():
            files, meta = get_checkpoint_shard_files(str(out), str(out / INDEX))
            expected = {t.name: shard for shard, plan in plans.items() for t in plan}
            if sorted(Path(f).name for f in files) != sorted(plans) \
                    or meta["weight_map"] != expected:
                raise FetchError(f"{out / INDEX} does not list the converted shards' tensors")
            if meta["total_size"] != sum(t.nbytes for p in plans.values() for t in p):
                raise FetchError(f"{out / INDEX}: total_size is not the shards' data size")
    except (OSError, ValueError, KeyError) as exc:
        raise FetchError(f"transformers cannot read the converted model in {out}: {exc}") from exc
    for shard, plan in plans.items():
        with safe_open(str(out / shard), framework="pt") as f:
            have = {n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape()))
                    for n in f.keys()}
        if have != {t.name: (CODE_OF[t.dtype], t.shape) for t in plan} \
                or not shard_is_complete(out / shard, plan):
            raise FetchError(f"{out / shard} does not hold the expected tensors; rerun to "
                             "convert it again")


# ----------------------------------------------------------------------------------------------
# manifest (idempotence)
# ----------------------------------------------------------------------------------------------
def output_files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(out.iterdir())
            if p.is_file() and p.name not in (MANIFEST, PENDING) and not p.name.endswith(PARTIAL)}


def dtype_counts(plans: dict[str, list[TensorPlan]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in (t for plan in plans.values() for t in plan):
        key = str(t.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + 1
    return counts


def write_manifest(out: Path, model: str, revision: str | None, commit: str | None,
                   keep_modules: list[str], plans: dict[str, list[TensorPlan]],
                   upgraded: dict | None = None) -> dict:
    files = output_files(out)
    manifest = {
        "model": model, "revision": revision or "main", "commit": commit,
        "format": "safetensors", "dtype": "float16", "kept_in_float32": keep_modules,
        "tensors": dtype_counts(plans), "files": files, "total_bytes": sum(files.values()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "written_by": "builder/fetch_model.py",
    }
    if upgraded is not None:  # what the pre-2024 layout lacked and the fetch added
        manifest["upgraded"] = upgraded
    atomic_write(out / MANIFEST, lambda f: f.write(json_bytes(manifest)))
    return manifest


def claim_output(out: Path, model: str) -> None:
    """Mark ``out`` as being filled with ``model`` (until the manifest is written), refusing if
    an unfinished fetch of another model left files there: they must not be mixed."""
    try:
        other = read_json(out / PENDING).get("model")
    except (OSError, ValueError):
        other = None
    if other not in (None, model):
        raise FetchError(f"{out} holds an unfinished fetch of {other}; delete {out} and "
                         f"{staging_dir_for(out)}, or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / PENDING, lambda f: f.write(json_bytes({"model": model})))
    (out / MANIFEST).unlink(missing_ok=True)  # stale: it is written again when all is done


def completed_manifest(out: Path, model: str, revision: str | None) -> dict | None:
    """The manifest if ``out`` holds a finished conversion of ``model`` (at ``revision`` when
    given) with every listed file at its size; None if there is nothing finished to reuse."""
    try:
        manifest = read_json(out / MANIFEST)
    except (OSError, ValueError):
        return None
    wanted = f"{model}@{revision}" if revision else model
    if manifest.get("model") != model or (
            revision and revision not in (manifest.get("revision"), manifest.get("commit"))):
        raise FetchError(
            f"{out} already holds {manifest.get('model')}@{manifest.get('commit')}, not "
            f"{wanted}; pass another --out or delete {out}")
    for name, size in manifest.get("files", {}).items():
        path = out / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return manifest


# ----------------------------------------------------------------------------------------------
# layout upgrade (BLIP-2 checkpoints saved before late 2024; see the module docstring)
# ----------------------------------------------------------------------------------------------
IMAGE_TOKEN = "<image>"
NUM_QUERY_TOKENS = 32
BLIP2_MODEL_TYPE = "blip-2"
BLIP2_ARCH = "Blip2ForConditionalGeneration"
OLD_LAYOUT = "pre-2024 BLIP-2 layout"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
ADDED_TOKENS = "added_tokens.json"  # written by older transformers' slow tokenizers
PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"  # the image processor: the old repos' only one
UPGRADE_RECORD = "layout_upgrade.json"  # --upgrade of a directory without a manifest
# Input-embedding tensors of BLIP-2's language models (OPT: decoder.embed_tokens, T5: shared).
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "shared.weight")
# How the Hub's updated BLIP-2 tokenizers (and Blip2Processor) add it: special, not normalised.
IMAGE_TOKEN_ENTRY = {"content": IMAGE_TOKEN, "single_word": False, "lstrip": False,
                     "rstrip": False, "normalized": False, "special": True}


@dataclass(frozen=True)
class Layout:
    """What a model directory lacks of the current BLIP-2 layout, and how to add it."""
    missing: tuple[str, ...]  # empty: nothing to upgrade
    image_token_id: int | None  # <image>'s id after the upgrade
    add_token: bool  # the tokenizer lacks <image>
    set_index: bool  # config.json lacks image_token_index
    processor: str | None  # "add" num_query_tokens to processor_config.json, "create" it, None
    num_query_tokens: int | None
    tokens: int  # the tokenizer's size now
    rows: int | None  # rows of the input embedding table
    rows_from: str  # where ``rows`` was read

    def added(self) -> dict:
        added: dict = {}
        if self.add_token:
            added[IMAGE_TOKEN] = self.image_token_id
        if self.set_index:
            added["image_token_index"] = self.image_token_id
        if self.processor:
            added["num_query_tokens"] = self.num_query_tokens
        return added


def json_text(obj) -> bytes:
    """JSON as tokenizers and transformers write it (indent 2, unicode kept as it is)."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def is_embedding(name: str) -> bool:
    return name.startswith("language_model.") and name.endswith(EMBEDDING_SUFFIXES)


def embedding_rows(model_dir: Path, config: dict) -> tuple[int | None, str]:
    """Rows of the language model's input embedding, from the safetensors header of its tensor
    (no weights read), else ``text_config.vocab_size``; (None, why) if neither is there."""
    try:
        shards, index = source_shards(model_dir)
    except FetchError:
        shards, index = [], None
    if index is not None:  # only the shard that holds it
        shards = sorted({s for n, s in index.get("weight_map", {}).items() if is_embedding(n)})
    for shard in shards:
        try:
            _, header = read_header(model_dir / shard)
        except (OSError, ValueError, struct.error):
            continue
        for name, info in sorted(header.items()):
            if is_embedding(name) and isinstance(info, dict) and len(info.get("shape", ())) == 2:
                return int(info["shape"][0]), f"{name} in {shard}"
    vocab = (config.get("text_config") or {}).get("vocab_size")
    if isinstance(vocab, int):
        return vocab, "text_config.vocab_size"
    return None, ("no language_model embedding tensor in the safetensors headers and no "
                  "text_config.vocab_size in config.json")


def load_tokenizer(model_dir: Path):
    import transformers
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FetchError(f"transformers cannot read the tokenizer in {model_dir}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc


def inspect_layout(model_dir: Path) -> Layout:
    """What ``model_dir`` lacks of the current BLIP-2 layout. Raises FetchError, saying why,
    if it lacks something that cannot be added, or if what it has contradicts itself."""
    try:
        config = read_json(model_dir / CONFIG)
    except (OSError, ValueError) as exc:
        raise FetchError(f"cannot read {model_dir / CONFIG}: {exc}") from exc
    tok = load_tokenizer(model_dir)
    vocab = tok.get_vocab()
    have = vocab.get(IMAGE_TOKEN)
    index = config.get("image_token_index")
    nqt = config.get("num_query_tokens")
    if have is not None and index is not None and have != index:
        raise FetchError(f"{model_dir}: the tokenizer has {IMAGE_TOKEN} at id {have}, but "
                         f"config.json says image_token_index {index}; one of them is wrong, "
                         "and this tool cannot tell which (fix the checkpoint where it was made)")
    processor, proc_nqt = None, None
    if (model_dir / PROCESSOR_CONFIG).is_file():
        try:
            proc_nqt = read_json(model_dir / PROCESSOR_CONFIG).get("num_query_tokens")
        except (OSError, ValueError) as exc:
            raise FetchError(f"cannot read {model_dir / PROCESSOR_CONFIG}: {exc}") from exc
        if proc_nqt is None:
            processor = "add"
    elif (model_dir / PREPROCESSOR_CONFIG).is_file():
        processor = "create"  # the old repos had only the image processor's config
    missing = [what for what, absent in (
        (f"no {IMAGE_TOKEN} token in the tokenizer", have is None),
        ("no image_token_index in config.json", index is None),
        (f"no num_query_tokens in {PROCESSOR_CONFIG}", processor is not None)) if absent]
    tokens = max(vocab.values()) + 1 if vocab else 0
    if not missing:
        return Layout((), have, False, False, None, nqt, tokens, None, "")

    def refuse(why: str) -> FetchError:
        return FetchError(f"cannot upgrade {model_dir} from the {OLD_LAYOUT} "
                          f"({', '.join(missing)}): {why}")

    model_type = config.get("model_type")
    archs = config.get("architectures") or [BLIP2_ARCH]
    if model_type != BLIP2_MODEL_TYPE or BLIP2_ARCH not in archs:
        raise refuse(f"it is not a BLIP-2 captioning checkpoint (config.json: model_type "
                     f"{model_type!r}, architectures {archs}); the worker loads {BLIP2_ARCH} "
                     "checkpoints only")
    if nqt != NUM_QUERY_TOKENS:
        raise refuse(f"config.json says num_query_tokens {nqt}, not {NUM_QUERY_TOKENS}: the "
                     "worker's BLIP-2 expects 32 query tokens")
    if proc_nqt is not None and proc_nqt != nqt:
        raise refuse(f"{PROCESSOR_CONFIG} says num_query_tokens {proc_nqt}, config.json {nqt}")
    newline = tok("\n", add_special_tokens=False).input_ids
    if len(newline) != 1:
        raise refuse(f"the tokenizer splits '\\n' into {len(newline)} tokens, not one: captions "
                     "end at the newline token (OPT's 50118), so this tokenizer cannot be used")
    rows, rows_from = embedding_rows(model_dir, config)
    if rows is None:
        raise refuse(f"cannot tell how many rows the embedding table has ({rows_from})")
    if have is not None:
        image_id = have
    else:
        image_id = tokens  # the first id after the tokenizer's tokens
        if index is not None and index != image_id:
            raise refuse(f"config.json says image_token_index {index}, but {IMAGE_TOKEN} can only "
                         f"be added at id {image_id}, the first after the tokenizer's "
                         f"{tokens} tokens")
        if image_id >= rows:
            raise refuse(f"the tokenizer already uses every row of the embedding table "
                         f"({tokens} tokens, {rows} rows: {rows_from}), so adding {IMAGE_TOKEN} "
                         "would need a new, untrained row; save the checkpoint with its "
                         f"{IMAGE_TOKEN} token from the code that trained it")
    if image_id >= rows:
        raise refuse(f"{IMAGE_TOKEN} is id {image_id}, outside the embedding table ({rows} rows: "
                     f"{rows_from})")
    return Layout(tuple(missing), image_id, have is None, index is None, processor, nqt, tokens,
                  rows, rows_from)


def upgraded_files(model_dir: Path, layout: Layout) -> dict[str, bytes]:
    """The new contents of the files ``layout`` changes, in the order to write them (tokenizer,
    then config, then processor: an interrupted upgrade is finished by running it again)."""
    files: dict[str, bytes] = {}
    image_id = layout.image_token_id
    if layout.add_token:
        fast = model_dir / TOKENIZER_JSON
        if fast.is_file():
            data = read_json(fast)
            data["added_tokens"] = sorted([*data.get("added_tokens", []),
                                           {"id": image_id, **IMAGE_TOKEN_ENTRY}],
                                          key=lambda t: t["id"])
            files[TOKENIZER_JSON] = json_text(data)
        if (model_dir / TOKENIZER_CONFIG).is_file():
            data = read_json(model_dir / TOKENIZER_CONFIG)
            if "added_tokens_decoder" in data or not fast.is_file():
                data.setdefault("added_tokens_decoder", {})[str(image_id)] = IMAGE_TOKEN_ENTRY
                files[TOKENIZER_CONFIG] = json_text(data)
        if (model_dir / ADDED_TOKENS).is_file():
            files[ADDED_TOKENS] = json_text({**read_json(model_dir / ADDED_TOKENS),
                                             IMAGE_TOKEN: image_id})
        if not files:
            raise FetchError(f"{model_dir} has neither {TOKENIZER_JSON} nor {TOKENIZER_CONFIG}: "
                             f"nowhere to add {IMAGE_TOKEN}")
    if layout.set_index:
        files[CONFIG] = json_bytes({**read_json(model_dir / CONFIG), "image_token_index": image_id})
    if layout.processor == "add":
        files[PROCESSOR_CONFIG] = json_bytes({**read_json(model_dir / PROCESSOR_CONFIG),
                                              "num_query_tokens": layout.num_query_tokens})
    elif layout.processor == "create":  # as the updated Hub repos have it
        files[PROCESSOR_CONFIG] = json_bytes({"num_query_tokens": layout.num_query_tokens,
                                              "processor_class": "Blip2Processor"})
    return files


def check_upgraded(model_dir: Path, files: dict[str, bytes], layout: Layout) -> None:
    """Load the tokenizer and config of ``model_dir`` with ``files`` replaced, in a temporary
    copy (no weights): ``<image>`` is one special token at its id, every other text is tokenized
    as before, the config points at it. Raises FetchError."""
    import transformers
    before = load_tokenizer(model_dir)
    with tempfile.TemporaryDirectory(prefix="blip2-upgrade-") as tmp:
        tmp_dir = Path(tmp)
        for path in side_files(model_dir):
            shutil.copyfile(path, tmp_dir / path.name)
        for name, data in files.items():
            (tmp_dir / name).write_bytes(data)
        tok = load_tokenizer(tmp_dir)
        config = transformers.AutoConfig.from_pretrained(tmp_dir, local_files_only=True)
    image_id = layout.image_token_id
    problems = []
    if tok.get_vocab().get(IMAGE_TOKEN) != image_id:
        problems.append(f"the tokenizer has {IMAGE_TOKEN} at {tok.get_vocab().get(IMAGE_TOKEN)}")
    if tok(IMAGE_TOKEN, add_special_tokens=False).input_ids != [image_id] \
            or tok.decode([image_id], skip_special_tokens=True) != "":
        problems.append(f"{IMAGE_TOKEN} is not read as one special token")
    text = "a photo of a cat\n"
    if tok(text).input_ids != before(text).input_ids:
        problems.append("other text is tokenized differently")
    plain = before(text, add_special_tokens=False).input_ids
    if tok(IMAGE_TOKEN + text, add_special_tokens=False).input_ids != [image_id, *plain]:
        problems.append(f"{IMAGE_TOKEN} before a text is not split off as one token")
    if config.image_token_index != image_id:
        problems.append(f"config.image_token_index reads {config.image_token_index}")
    if problems:
        raise FetchError(f"the upgrade of {model_dir} did not come out right ("
                         + "; ".join(problems) + "); nothing was changed")


def apply_upgrade(model_dir: Path, layout: Layout, log: Callable[[str], None] = print) -> dict:
    """Upgrade ``model_dir`` as ``layout`` says (checked first in a temporary copy); returns the
    record for the manifest."""
    files = upgraded_files(model_dir, layout)
    check_upgraded(model_dir, files, layout)
    for name, data in files.items():
        atomic_write(model_dir / name, lambda f, data=data: f.write(data))
    added = layout.added()
    log(f"upgraded {model_dir} from the {OLD_LAYOUT}: added "
        + ", ".join(f"{k} = {v}" for k, v in added.items())
        + (f" ({layout.tokens} tokens before, {layout.rows} embedding rows)"
           if layout.add_token else ""))
    return {"from": OLD_LAYOUT, "missing": list(layout.missing), "added": added,
            "tokenizer_size_before": layout.tokens, "embedding_rows": layout.rows,
            "embedding_rows_from": layout.rows_from, "files": sorted(files)}


def upgrade_in_place(model_dir: Path, by: str, layout: Layout | None = None) -> dict | None:
    """Upgrade the finished model directory ``model_dir`` if it needs it, and record it: in its
    manifest (sizes kept current, so ``completed_manifest`` still accepts it) or, without one,
    in ``layout_upgrade.json``. Returns the record, None if there was nothing to do."""
    layout = layout or inspect_layout(model_dir)
    if not layout.missing:
        return None
    record = {**apply_upgrade(model_dir, layout),
              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by": by}
    try:
        manifest = read_json(model_dir / MANIFEST)
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        files = dict(manifest["files"])
        files.update({name: (model_dir / name).stat().st_size for name in record["files"]})
        manifest.update(files=files, total_bytes=sum(files.values()), upgraded=record)
        atomic_write(model_dir / MANIFEST, lambda f: f.write(json_bytes(manifest)))
    else:
        atomic_write(model_dir / UPGRADE_RECORD, lambda f: f.write(json_bytes(
            {"upgraded": record, "written_by": "builder/fetch_model.py"})))
    return record


def upgrade_directory(model_dir: Path) -> int:
    """``--upgrade DIR``: upgrade a local model directory in place (no network)."""
    if not model_dir.is_dir():
        raise FetchError(f"--upgrade {model_dir}: no such directory")
    if not (model_dir / CONFIG).is_file():
        raise FetchError(f"--upgrade {model_dir}: no {CONFIG} there, so it is not a model "
                         "directory")
    if (model_dir / PENDING).exists():
        raise FetchError(f"{model_dir} holds an unfinished fetch; rerun that fetch_model.py "
                         "command (it upgrades the layout when it finishes)")
    layout = inspect_layout(model_dir)
    if not layout.missing:
        print(f"nothing to do: {model_dir} already has the current BLIP-2 layout "
              f"({IMAGE_TOKEN} = id {layout.image_token_id} = config.image_token_index)")
        return 0
    upgrade_in_place(model_dir, "builder/fetch_model.py --upgrade", layout)
    return 0


# ----------------------------------------------------------------------------------------------
# download
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    will_download: bool


def hub_call(what: str, model: str, fn: Callable, **kwargs):
    """Call a huggingface_hub function; its errors become a FetchError saying what to check."""
    try:
        return fn(model, **kwargs)
    except (OSError, ValueError) as exc:
        raise FetchError(f"cannot {what} {model}: {type(exc).__name__}: {exc}. Check the repo id "
                         "and --revision, the network, and HF_TOKEN for gated or private "
                         "repos.") from exc


def snapshot_kwargs(staging: Path) -> dict:
    return dict(local_dir=staging, cache_dir=staging / HUB_CACHE, allow_patterns=ALLOW_PATTERNS,
                ignore_patterns=IGNORE_PATTERNS, token=hf_token())


def list_remote(model: str, revision: str | None, staging: Path) -> tuple[str, list[RemoteFile]]:
    """(commit, files) of the snapshot ``download`` would fetch, from a dry run."""
    import huggingface_hub
    infos = hub_call("list", model, huggingface_hub.snapshot_download, revision=revision,
                     dry_run=True, **snapshot_kwargs(staging))
    if not infos:
        raise FetchError(f"{model} has no files matching {ALLOW_PATTERNS}")
    files = [RemoteFile(i.filename, i.file_size or 0, i.will_download) for i in infos]
    if not any(f.name.endswith(".safetensors") for f in files):
        raise FetchError(f"{model} has no safetensors weights; this tool converts safetensors "
                         "checkpoints only")
    return infos[0].commit_hash, files


def download(model: str, commit: str, staging: Path) -> Path:
    import huggingface_hub
    path = hub_call("download", model, huggingface_hub.snapshot_download, revision=commit,
                    **snapshot_kwargs(staging))
    return Path(path)


# ----------------------------------------------------------------------------------------------
# the two engines
# ----------------------------------------------------------------------------------------------
def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fetch_transformers(args: argparse.Namespace) -> int:
    out, staging = args.out, args.staging
    if out.exists() and not out.is_dir():
        raise FetchError(f"--out {out} exists and is not a directory")
    done = completed_manifest(out, args.model, args.revision)
    if done is not None:
        print(f"already present: {out} ({done['model']}@{done['commit']}, "
              f"{gb(done['total_bytes'])}); delete it to fetch again")
        # fetched before this tool upgraded old layouts: upgrade it now (no network)
        upgrade_in_place(out, "builder/fetch_model.py (already present)")
        return 0
    commit, files = list_remote(args.model, args.revision, staging)
    weights = sum(f.size for f in files if f.name.endswith(".safetensors"))
    check_disk(disk_needs(staging, out, sum(f.size for f in files if f.will_download), weights,
                          same_filesystem(staging, out)))
    claim_output(out, args.model)
    print(f"downloading {args.model}@{commit} ({gb(weights)} of fp32 weights) into {staging}")
    src = download(args.model, commit, staging)
    layout = inspect_layout(src)  # refuses what cannot be upgraded before the long conversion
    if layout.missing:
        print(f"{args.model}@{commit} is in the {OLD_LAYOUT} ({', '.join(layout.missing)}): "
              "it will be upgraded after the conversion")
    keep = keep_fp32_modules(src)
    print(f"converting to float16 in {out} (kept in float32: {', '.join(keep) or 'nothing'})")
    plans = convert_checkpoint(src, out, keep)
    upgraded = apply_upgrade(out, layout) if layout.missing else None
    verify_output(out, plans)
    manifest = write_manifest(out, args.model, args.revision, commit, keep, plans, upgraded)
    (out / PENDING).unlink(missing_ok=True)
    print(f"done: {out} holds {gb(manifest['total_bytes'])} in {len(manifest['files'])} files "
          f"(tensors: {manifest['tensors']}); the fp32 download was {gb(dir_bytes(src))}")
    if args.keep_staging:
        print(f"kept the fp32 download in {staging}")
        return 0
    try:
        shutil.rmtree(staging)
    except OSError as exc:  # a Docker layer must not keep the fp32 copy: fail loudly
        raise FetchError(f"the model is ready, but the fp32 download in {staging} could not be "
                         f"deleted ({exc}); delete it by hand") from exc
    return 0


def fetch_lavis(args: argparse.Namespace) -> int:
    """``lavis_checkpoints.prefetch`` downloads what the LAVIS engine loads (its own code)."""
    sys.path.insert(0, str(SRC_DIR))
    from engines import lavis_checkpoints  # only in the LAVIS environment (requirements-lavis.txt)
    from errors import ModelLoadError
    try:
        env = lavis_checkpoints.prefetch(cache_dir=args.cache_dir)
    except ModelLoadError as exc:
        raise FetchError(str(exc)) from exc
    if env:
        print("run the worker with: " + " ".join(f"{k}={v}" for k, v in sorted(env.items())))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.upgrade is not None:
            return upgrade_directory(args.upgrade)
        if args.engine == "lavis":
            return fetch_lavis(args)
        return fetch_transformers(args)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(f"error: the disk filled up ({exc}). Free some space and rerun: finished shards "
              "are kept.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
