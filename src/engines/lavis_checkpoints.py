"""The files ``BLIP_ENGINE=lavis`` loads: where LAVIS reads them, what is missing, fetching them
(``prefetch``, for ``builder/fetch_model.py --engine lavis``), and loading them with ``torch.load``.

Model sources (``BLIP_MODEL``): the default (or ``caption_coco_opt2.7b``) loads the real files from
the caches LAVIS reads -- ``eva_vit_g.pth`` and ``blip2_caption_opt2.7b.pth`` in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``), ``facebook/opt-2.7b`` and ``bert-base-uncased`` in the Hugging
Face cache -- which ``prefetch`` downloads (``python builder/fetch_model.py --engine lavis``).
``tiny-random`` builds a tiny model offline (``testing_models``).

torch >= 2.6 loads with ``weights_only=True`` by default and LAVIS calls ``torch.load`` without the
argument. ``trusted_checkpoint_loads`` keeps that safe default for every file and, only for the
two LAVIS checkpoints named above at their place in the torch hub cache, falls back to
``weights_only=False`` if (and only if) the safe load refuses them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import urlparse

import torch

from errors import ModelLoadError

log = logging.getLogger("blip.engine.lavis")

# What LAVIS downloads for caption_coco_opt2.7b. The URLs are LAVIS's own (create_eva_vit_g and
# the caption yaml's `finetuned`; a test keeps them in step); the file name is the URL's last
# part, as LAVIS's download_cached_file stores it.
_LAVIS_BUCKET = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"
EVA_VIT_G_URL = _LAVIS_BUCKET + "eva_vit_g.pth"
CAPTION_CHECKPOINT_URL = _LAVIS_BUCKET + "blip2_caption_opt2.7b.pth"
CHECKPOINT_URLS = (EVA_VIT_G_URL, CAPTION_CHECKPOINT_URL)
OPT_REPO = "facebook/opt-2.7b"
BERT_REPO = "bert-base-uncased"
WEIGHTS_SAFETENSORS = "model.safetensors"
WEIGHTS_PICKLE = "pytorch_model.bin"


# ----------------------------------------------------------------------------------------------
# where the real files live, what is missing, and fetching them (builder/fetch_model.py)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFFile:
    """One file of a Hugging Face repo: the first of ``names`` the repo has is the one used."""
    repo: str
    names: tuple[str, ...]
    required: bool = True


@dataclass(frozen=True)
class CacheLayout:
    """The two caches LAVIS reads, and the environment the worker needs to read them there."""
    torch_checkpoints: Path  # timm's download_cached_file: torch.hub.get_dir()/checkpoints
    hf_cache: Path  # transformers' TRANSFORMERS_CACHE
    env: dict[str, str] = field(default_factory=dict)

    def checkpoint_targets(self) -> list[tuple[str, Path]]:
        """(url, file) of each LAVIS checkpoint, named as LAVIS names its download."""
        return [(url, self.torch_checkpoints / Path(urlparse(url).path).name)
                for url in CHECKPOINT_URLS]


def lavis_checkpoint_paths(layout: CacheLayout | None = None) -> list[Path]:
    """Where LAVIS reads its own checkpoints: the only files ``trusted_checkpoint_loads``
    may load with ``weights_only=False``."""
    return [path for _url, path in (layout or cache_layout()).checkpoint_targets()]


def cache_layout(cache_dir: str | os.PathLike | None = None) -> CacheLayout:
    """The caches under ``cache_dir`` (``torch/`` and ``huggingface/``; the worker then needs
    ``TORCH_HOME`` and ``HF_HOME`` from ``env``), or, by default, the ones this process reads."""
    if cache_dir is not None:
        root = Path(cache_dir).absolute()
        return CacheLayout(root / "torch" / "hub" / "checkpoints", root / "huggingface" / "hub",
                           env={"TORCH_HOME": str(root / "torch"),
                                "HF_HOME": str(root / "huggingface")})
    from transformers.utils.hub import TRANSFORMERS_CACHE
    return CacheLayout(Path(torch.hub.get_dir()) / "checkpoints", Path(TRANSFORMERS_CACHE))


def hf_files(safetensors_available: bool) -> list[HFFile]:
    """The Hugging Face files LAVIS loads: OPT's slow tokenizer, config and weights, and BERT's
    tokenizer, config and weights (for the Q-Former). Weights: the file transformers 4.25.1
    picks -- ``model.safetensors`` first when the safetensors package is installed."""
    weights = ((WEIGHTS_SAFETENSORS, WEIGHTS_PICKLE) if safetensors_available
               else (WEIGHTS_PICKLE,))
    out = []
    for repo, vocab in ((OPT_REPO, ("vocab.json", "merges.txt")), (BERT_REPO, ("vocab.txt",))):
        out += [HFFile(repo, (name,)) for name in ("config.json",) + vocab]
        out += [HFFile(repo, (name,), required=False)
                for name in ("tokenizer_config.json", "special_tokens_map.json")]
        out.append(HFFile(repo, weights))
    return out


def _safetensors_available() -> bool:
    from transformers.utils import is_safetensors_available
    return is_safetensors_available()


def _hf_cached(item: HFFile, hf_cache: Path) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(item.repo, name, cache_dir=str(hf_cache)), str)
               for name in item.names)


def _have(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def missing_files(layout: CacheLayout | None = None) -> list[str]:
    """What the real model still lacks, readable (empty when everything is in place)."""
    layout = layout or cache_layout()
    missing = [str(path) for path in lavis_checkpoint_paths(layout) if not _have(path)]
    missing += [f"{item.repo}/{' or '.join(item.names)}"
                for item in hf_files(_safetensors_available())
                if item.required and not _hf_cached(item, layout.hf_cache)]
    return missing


def _download_url(url: str, target: Path) -> None:
    torch.hub.download_url_to_file(url, str(target), progress=True)  # temp file + rename


def _download_hf(repo: str, name: str, hf_cache: Path) -> bool:
    """Download one file into the cache; False when the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError
    try:
        hf_hub_download(repo, name, cache_dir=str(hf_cache))
    except EntryNotFoundError:
        return False
    return True


def prefetch(cache_dir: str | os.PathLike | None = None, *,
             fetch_url: Callable[[str, Path], None] = _download_url,
             fetch_hf: Callable[[str, str, Path], bool] = _download_hf,
             say: Callable[[str], None] = print) -> dict[str, str]:
    """Download everything ``BLIP_ENGINE=lavis`` loads into the caches LAVIS reads; files
    already there are skipped. Returns the environment the worker needs to find them (empty for
    the default caches). Used by ``builder/fetch_model.py --engine lavis``."""
    layout = cache_layout(cache_dir)
    for url, target in layout.checkpoint_targets():
        if _have(target):
            say(f"have {target}")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        say(f"downloading {url} -> {target}")
        fetch_url(url, target)
    for item in hf_files(_safetensors_available()):
        label = f"{item.repo}/{' or '.join(item.names)}"
        if _hf_cached(item, layout.hf_cache):
            say(f"have {label}")
            continue
        say(f"downloading {label} -> {layout.hf_cache}")
        if not any(fetch_hf(item.repo, name, layout.hf_cache) for name in item.names):
            if item.required:
                raise ModelLoadError(f"{item.repo} has none of {', '.join(item.names)}")
    return layout.env


# ----------------------------------------------------------------------------------------------
# torch.load and weights_only
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def trusted_checkpoint_loads(trusted: Iterable[str | os.PathLike]) -> Iterator[None]:
    """While active, a ``torch.load`` of one of the ``trusted`` files that does not say
    ``weights_only`` is first tried with ``weights_only=True`` and, only if that refuses the
    file, repeated with ``weights_only=False`` (a warning says so). Every other call keeps
    torch's own default. Swaps ``torch.load`` process-wide: use it while loading, before the
    worker serves."""
    paths = {os.path.realpath(p) for p in trusted}
    original = torch.load

    def load(f, *args, **kwargs):
        if ("weights_only" in kwargs or not isinstance(f, (str, os.PathLike))
                or os.path.realpath(f) not in paths):
            return original(f, *args, **kwargs)
        try:
            return original(f, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as exc:
            log.warning("%s is not loadable with weights_only=True (%s); loading it with "
                        "weights_only=False as a trusted LAVIS checkpoint", f,
                        str(exc).splitlines()[-1][:200])
            return original(f, *args, weights_only=False, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
