"""Where the BLIP-2 model comes from (env ``BLIP_MODEL``), for the transformers engine.

- a Hugging Face repo id (default ``Salesforce/blip2-opt-2.7b-coco``, the HF conversion of
  LAVIS ``blip2_opt`` / ``caption_coco_opt2.7b``) or a local directory such as the one
  ``builder/fetch_model.py`` writes: loaded with ``Blip2ForConditionalGeneration`` and the
  repo's tokenizer, SDPA attention, ``local_files_only`` when ``HF_HUB_OFFLINE=1``.
- ``tiny-random`` and ``random-full`` (``SYNTHETIC``): built in code by ``testing_models``, which
  the engine calls for them instead.

``load_model(source, device, dtype)`` returns a ``LoadedModel`` and checks the BLIP-2 invariants
that transformers otherwise fails silently on (see ``check_invariants``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from errors import ModelLoadError

TINY = "tiny-random"
RANDOM_FULL = "random-full"
SYNTHETIC = (TINY, RANDOM_FULL)  # BLIP_MODEL values built in code (testing_models), not loaded
NUM_QUERY_TOKENS = 32
IMAGE_TOKEN = "<image>"


@dataclass
class LoadedModel:
    model: Any  # Blip2ForConditionalGeneration
    tokenizer: Any
    model_id: str  # what the output's "model" field reports
    image_token_id: int
    eos_token_id: int  # the "\n" token: captions end at a newline (LAVIS / HF coco configs)
    pad_token_id: int
    num_query_tokens: int
    image_size: int
    load_s: float = 0.0


def newline_id(tok) -> int:
    ids = tok("\n", add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ModelLoadError(f"the tokenizer splits '\\n' into {len(ids)} tokens; expected one "
                             "(OPT tokenizers map it to id 50118)")
    return ids[0]


# ----------------------------------------------------------------------------------------------
# loading a checkpoint
# ----------------------------------------------------------------------------------------------
def load_pretrained(source: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes")
    kwargs = dict(local_files_only=offline)
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        # device_map (accelerate) loads the weights straight onto the GPU: no CPU copy
        model = Blip2ForConditionalGeneration.from_pretrained(
            source, dtype=dtype, attn_implementation="sdpa", device_map=str(device), **kwargs)
    except OSError as exc:  # missing files, no network, unknown repo
        raise ModelLoadError(missing_weights_message(source, exc)) from exc
    except (ValueError, RuntimeError, KeyError) as exc:  # files there but unusable
        raise ModelLoadError(f"cannot load the model BLIP_MODEL={source!r}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}. "
                             "Re-download it with `python builder/fetch_model.py`.") from exc
    tok.padding_side = "left"
    return _loaded(model.eval(), tok, source)


def missing_weights_message(source: str, exc: BaseException | None = None) -> str:
    reason = f" ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})" if exc else ""
    if os.path.isabs(source) or source.startswith(".") or os.path.exists(source):
        fetch = (f"`python builder/fetch_model.py --out {source}` (downloads "
                 "Salesforce/blip2-opt-2.7b-coco there)")
    else:
        local = "models/" + source.rstrip("/").split("/")[-1]  # as the README's example
        fetch = (f"`python builder/fetch_model.py --model {source} --out {local}` and set "
                 f"BLIP_MODEL={local}")
    return (f"cannot load the model BLIP_MODEL={source!r}{reason}. Download it first with "
            f"{fetch} (the Docker image does this at build time), or try the worker without "
            "weights: `make run BLIP_MODEL=tiny-random` (BLIP_MODEL=tiny-random).")


def _loaded(model, tok, model_id: str) -> LoadedModel:
    cfg = model.config
    loaded = LoadedModel(model=model, tokenizer=tok, model_id=model_id,
                         image_token_id=cfg.image_token_index, eos_token_id=newline_id(tok),
                         pad_token_id=tok.pad_token_id, num_query_tokens=cfg.num_query_tokens,
                         image_size=cfg.vision_config.image_size)
    check_invariants(loaded)
    return loaded


def old_layout(m: LoadedModel) -> str | None:
    """What ``m`` lacks if it was saved in the BLIP-2 layout from before late 2024 (when the Hub
    repos gained an ``<image>`` token and ``image_token_index``), else None."""
    missing = []
    if IMAGE_TOKEN not in m.tokenizer.get_vocab():
        missing.append(f"no {IMAGE_TOKEN} token in the tokenizer")
    if m.model.config.image_token_index is None:
        missing.append("no image_token_index in config.json")
    return ", ".join(missing) or None


def upgrade_message(source: str, missing: str) -> str:
    """How to fix an old-layout checkpoint: builder/fetch_model.py upgrades it."""
    if os.path.isdir(source):
        fix = (f"Upgrade it in place with `python builder/fetch_model.py --upgrade {source}` "
               "(no download)")
    else:
        local = "models/" + source.rstrip("/").split("/")[-1]  # as missing_weights_message
        fix = (f"Fetch it with `python builder/fetch_model.py --model {source} --out {local}` "
               f"(which upgrades it) and set BLIP_MODEL={local}")
    return (f"{source} was saved in the BLIP-2 layout from before late 2024 ({missing}), "
            f"which current transformers does not caption with. {fix}.")


def check_invariants(m: LoadedModel) -> None:
    """transformers silently ignores the image when these do not hold; fail loudly instead."""
    cfg = m.model.config
    problems = []
    old = old_layout(m)
    if cfg.num_query_tokens != NUM_QUERY_TOKENS:
        problems.append(f"num_query_tokens is {cfg.num_query_tokens}, expected 32")
    if old:
        pass  # below: the fix is an upgrade, not a re-download
    elif m.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != cfg.image_token_index:
        problems.append(f"the tokenizer's {IMAGE_TOKEN} id differs from config.image_token_index "
                        f"({cfg.image_token_index})")
    elif cfg.image_token_index >= m.model.get_input_embeddings().num_embeddings:
        problems.append("config.image_token_index is outside the embedding table")
    if m.pad_token_id is None:
        problems.append("the tokenizer has no pad token")
    if old and not problems and m.model_id not in SYNTHETIC:
        raise ModelLoadError(upgrade_message(m.model_id, old))
    if old:
        problems.append(f"it is in the pre-2024 BLIP-2 layout ({old})")
    if problems:
        raise ModelLoadError(f"{m.model_id} is not a usable BLIP-2 captioning checkpoint: "
                             + "; ".join(problems) + ". Re-download it with builder/fetch_model.py.")


def load_model(source: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load the checkpoint ``source`` (a repo id or a directory; the ``SYNTHETIC`` names are
    built by ``testing_models.load_model``). ``load_s`` excludes the one-off import of
    transformers."""
    import transformers.models.blip_2.modeling_blip_2  # noqa: F401  (import cost: seconds)
    t0 = time.perf_counter()
    loaded = load_pretrained(source, device, dtype)
    loaded.load_s = time.perf_counter() - t0
    return loaded
