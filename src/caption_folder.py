"""Caption every image in a folder: writes ``<stem>.txt`` next to each image.

    python src/caption_folder.py DIR                    # defaults of the API
    python src/caption_folder.py DIR --num-beams 5 --num-captions 3 --overwrite
    BLIP_MODEL=tiny-random python src/caption_folder.py DIR    # no weights needed (nonsense)

The same worker, run locally: the model and its settings come from the environment
(``BLIP_MODEL``, ``BLIP_DEVICE``, ... as in the README), images are decoded by
``inputs.decode_image`` and captioned in batches by the engine, and the generation flags are
made from ``schema.FIELDS`` and checked by ``schema.parse_request``, so their defaults and bounds
are the API's (``--num-beams 0`` fails as ``num_beams: 0`` does).

- Walks DIR and its subfolders, skipping hidden files and folders (a name starting with ".")
  and ``__MACOSX``. Images are chosen by extension (the formats the worker decodes: .jpg, .png,
  .webp, .gif, .bmp, .tif, .avif, ...); content is checked when decoding.
- File names follow ``deliver.CaptionNames`` (the rule of the API's caption zip): ``a.txt``
  for ``a.jpg``; ``a.png.txt`` when ``a.jpg`` is in the same folder. One caption per line, best
  first. A file is written whole (temporary file, then renamed), so an interrupted run leaves
  no half-written caption.
- An image whose caption file exists is skipped unless ``--overwrite``: a stopped run resumes.
- A bad image (truncated, not an image though named .jpg, too large) is reported by name and
  the run goes on. The model loads once; decoding runs on ``DECODE_WORKERS`` threads ahead of
  the GPU batches.
- Prints a progress bar (images/s) on stderr and a summary on stdout. Exit code 0 when nothing
  failed, 1 when some image failed (or the GPU failed), 2 for bad options, a bad setting, a
  model that does not load, or a DIR that is not a folder.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Sequence

from PIL import Image

import schema
from config import Config, ConfigError
from deliver import CaptionNames, caption_text
from errors import ImageError, JobError
from inputs import IMAGE_FORMATS, ImageSource, decode_image
from text import short

IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items()
                             if fmt in IMAGE_FORMATS)
NOT_FLAGS = ("data_url", "data_urls", "output_format")  # the folder is the source and the output
PLACEHOLDER_SOURCE = "data:image/png;base64,"  # satisfies parse_request's source rule only
FLAG_FIELDS = [s for s in schema.FIELDS if s.name not in NOT_FLAGS]
_FIELD_NAMES = re.compile(r"\b(" + "|".join(s.name for s in FLAG_FIELDS) + r")\b")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- options ---------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="caption_folder.py",
        description="Caption every image under DIR with BLIP-2, writing <stem>.txt next to each "
                    "image. The model and its settings come from the environment (BLIP_MODEL, "
                    "BLIP_DEVICE, ...), as for the worker.")
    p.add_argument("dir", metavar="DIR", help="folder of images (subfolders included)")
    p.add_argument("--overwrite", action="store_true",
                   help="caption images that already have a caption file too")
    add_request_flags(p)
    return p


def add_request_flags(p: argparse.ArgumentParser) -> None:
    """One flag per request field of ``FLAG_FIELDS`` (also used by ``caption_dataset.py``):
    default None (= not given), the API's default and bounds in the help."""
    types = {"int": int, "opt_int": int, "float": float, "str": str}
    for spec in FLAG_FIELDS:
        default = "unset" if spec.default is None else spec.default_text  # JSON null: omit it
        text = f"{spec.doc} Default {default}" + (f"; {spec.bounds}" if spec.bounds
                                                  else "") + "."
        kwargs: dict = {"dest": spec.name, "default": None, "help": text.replace("%", "%%")}
        if spec.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = types[spec.kind]
            kwargs["metavar"] = spec.kind.replace("opt_", "").upper()
        p.add_argument(flag(spec.name), **kwargs)


def parse_options(args: argparse.Namespace, cfg: Config) -> schema.CaptionRequest:
    """The generation flags given, checked by the API's own schema; JobError names the flags."""
    given = {s.name: getattr(args, s.name) for s in FLAG_FIELDS
             if getattr(args, s.name) is not None}
    try:
        return schema.parse_request({"data_url": PLACEHOLDER_SOURCE, **given}, cfg)
    except JobError as exc:
        text = exc.message.replace("invalid input: ", "invalid options: ", 1)
        raise JobError(_FIELD_NAMES.sub(lambda m: flag(m[1]), text)) from None


# --- finding the work ------------------------------------------------------------------------

def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def find_images(root: str) -> Iterator[tuple[str, ...]]:
    """Images under ``root`` as tuples of path parts, folders and files sorted by name."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        rel = os.path.relpath(dirpath, root)
        folder = () if rel == "." else tuple(rel.split(os.sep))
        for name in sorted(filenames):
            if not _hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield folder + (name,)


@dataclass
class Task:
    image: str  # path relative to DIR, for messages
    image_file: str
    caption_file: str


def plan(root: str, overwrite: bool) -> tuple[list[Task], int]:
    """The images to caption (in walk order) and how many already have a caption."""
    names = CaptionNames()
    todo, skipped = [], 0
    for parts in find_images(root):
        caption = os.path.join(root, *names.caption_file(parts[:-1], parts[-1]))
        if not overwrite and os.path.exists(caption):
            skipped += 1
            continue
        todo.append(Task("/".join(parts), os.path.join(root, *parts), caption))
    return todo, skipped


# --- captioning ------------------------------------------------------------------------------

@dataclass
class Summary:
    captioned: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def text(self, seconds: float) -> str:
        rate = f", {self.captioned / seconds:.1f} images/s" if self.captioned and seconds else ""
        return (f"captioned {self.captioned}, skipped {self.skipped} (already captioned), "
                f"failed {len(self.failed)} in {seconds:.1f}s{rate}")


def write_caption(path: str, text: str) -> None:
    """Write the whole file or nothing: a temporary hidden file in the same folder, renamed."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class FolderCaptioner:
    """Decodes ahead on a thread pool and captions in engine batches, one task list."""

    def __init__(self, engine, cfg: Config, request: schema.CaptionRequest, progress):
        self.engine = engine
        self.cfg = cfg
        self.request = request
        self.progress = progress  # a tqdm bar: update(n), write(text, file)
        limit = engine.batch_limit(request.generation)  # --batch-size caps it, as in the API
        self.batch = min(request.batch_size, limit) if request.batch_size else limit
        self.summary = Summary()

    def _prepare(self, task: Task):
        src = ImageSource((0, 0), task.image, partial(open, task.image_file, "rb"))
        return self.engine.preprocess(decode_image(src, self.cfg, self.engine.image_size))

    def _fail(self, task: Task, message: str) -> None:
        self.summary.failed.append((task.image, message))
        self.progress.write(f"failed: {task.image}: {message}", file=sys.stderr)
        self.progress.update(1)

    def run(self, tasks: Sequence[Task]) -> Summary:
        workers = self.cfg.decode_threads
        queue: deque[tuple[Task, Future]] = deque()
        ahead = iter(tasks)
        ready: list[tuple[Task, object]] = []
        with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
            def refill() -> None:
                while len(queue) < 2 * self.batch and (task := next(ahead, None)) is not None:
                    queue.append((task, pool.submit(self._prepare, task)))

            refill()
            while queue:
                task, future = queue.popleft()
                refill()
                try:
                    ready.append((task, future.result()))
                except ImageError as exc:
                    self._fail(task, exc.message)
                except Exception as exc:  # noqa: BLE001 - one image never stops the run
                    self._fail(task, f"could not read the image: {type(exc).__name__}: "
                                     f"{short(str(exc))}")
                if ready and (len(ready) >= self.batch or not queue):
                    self._caption(ready)
                    ready = []
        return self.summary

    def _caption(self, ready: list[tuple[Task, object]]) -> None:
        from errors import FatalDeviceError
        from params import compose
        req = self.request
        try:
            results, self.batch = self.engine.generate_with_fallback(
                [pixels for _, pixels in ready], [req.prompt] * len(ready), req.generation,
                self.batch)
        except FatalDeviceError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed batch costs only its images
            for task, _ in ready:
                self._fail(task, f"captioning failed: {type(exc).__name__}: {short(str(exc))}")
            return
        for (task, _), res in zip(ready, results):
            if res.error is not None:
                self._fail(task, res.error)
                continue
            texts = [compose(req.prompt, c, req.include_prompt) for c in res.captions]
            try:
                write_caption(task.caption_file, caption_text(texts))
            except OSError as exc:
                self._fail(task, f"could not write {os.path.basename(task.caption_file)}: "
                                 f"{exc.strerror or exc}")
                continue
            self.summary.captioned += 1
            self.progress.update(1)


# --- command line ----------------------------------------------------------------------------

def _fail_usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None, engine=None) -> int:
    """Run the command line; ``engine`` (already loaded) skips loading the model (tests)."""
    args = parser().parse_args(argv)
    try:
        cfg = Config.from_env()
        request = parse_options(args, cfg)
    except ConfigError as exc:
        return _fail_usage(str(exc))
    except JobError as exc:
        return _fail_usage(exc.message)
    root = args.dir
    if not os.path.isdir(root):
        return _fail_usage(f"{root}: not a folder; give the folder of images to caption")
    tasks, skipped = plan(root, args.overwrite)
    if not tasks:
        print(f"nothing to caption in {root}: {skipped} images already captioned "
              f"(--overwrite captions them again)" if skipped else
              f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return 0
    logging.basicConfig(level=cfg.log_level, format="%(levelname)s %(name)s: %(message)s")
    if engine is None:
        import modeling
        from engines import load_engine
        try:
            engine = load_engine(cfg)
        except (modeling.ModelLoadError, ValueError) as exc:
            return _fail_usage(str(exc))
    from errors import FatalDeviceError
    from tqdm import tqdm
    started = time.monotonic()
    with tqdm(total=len(tasks), unit="img", desc="captioning", file=sys.stderr,
              dynamic_ncols=True) as bar:
        captioner = FolderCaptioner(engine, cfg, request, bar)
        captioner.summary.skipped = skipped
        try:
            summary = captioner.run(tasks)
        except FatalDeviceError as exc:
            bar.write(f"error: the GPU failed ({short(str(exc), 200)}); captions written so "
                      "far are kept: run again to caption the rest", file=sys.stderr)
            print(captioner.summary.text(time.monotonic() - started))
            return 1
    print(summary.text(time.monotonic() - started))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
