"""Where the BLIP-2 model comes from (env ``BLIP_MODEL``), for the transformers engine.

- a Hugging Face repo id (default ``Salesforce/blip2-opt-2.7b-coco``, the HF conversion of
  LAVIS ``blip2_opt`` / ``caption_coco_opt2.7b``) or a local directory such as the one
  ``builder/fetch_model.py`` writes: loaded with ``Blip2ForConditionalGeneration`` and the
  repo's tokenizer, SDPA attention, ``local_files_only`` when ``HF_HUB_OFFLINE=1``.
- ``tiny-random``: a tiny BLIP-2 built in code (364 px ViT with patch 14 but tiny widths,
  Q-Former with 32 query tokens, tiny OPT) and a byte-level tokenizer built locally. No files,
  no network, fixed seed. Its weights are drawn large enough that distinct images give distinct
  captions, and its generation config suppresses every token but ``a``-``z`` and space, so its
  captions are readable nonsense ("qv dxe lkz") instead of control bytes.
- ``random-full``: the real architecture with random weights (the real checkpoint's compute),
  built directly on the target device in the target dtype; for GPU benchmarks.

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
NUM_QUERY_TOKENS = 32
IMAGE_TOKEN = "<image>"
# OPT ids (facebook/opt-*): <s>=0 <pad>=1 </s>=2 (OPT's BOS is </s>), "\n" = 50118, and the HF
# BLIP-2 OPT checkpoints add "<image>" as 50265 in a 50304-row (padded) embedding.
OPT_PAD, OPT_BOS = 1, 2
OPT_NEWLINE = 50118
OPT_IMAGE_TOKEN = 50265
OPT_VOCAB_ROWS = 50304


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


# ----------------------------------------------------------------------------------------------
# tokenizers built in code
# ----------------------------------------------------------------------------------------------
def _byte_vocab() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel
    return sorted(ByteLevel.alphabet())


def _gpt2_tokenizer(vocab: dict[str, int]):
    from transformers import GPT2Tokenizer
    tok = GPT2Tokenizer(vocab=vocab, merges=[], bos_token="</s>", eos_token="</s>",
                        unk_token="</s>", pad_token="<pad>", add_bos_token=True)
    tok.padding_side = "left"
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tok


def tiny_tokenizer():
    """Byte-level BPE (no merges) with OPT's special ids and ``<image>`` appended."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    return _gpt2_tokenizer({t: i for i, t in enumerate(specials + _byte_vocab())})


def full_vocab_tokenizer():
    """Byte-level tokenizer laid out with OPT-2.7b's ids where they matter: specials 0-3,
    "\\n" at 50118, ``<image>`` at 50265 (vocab rows 50304). Other rows are fillers: random-full
    only needs the ids and the compute to match the real model, not the words."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    newline_char = "\u010a"  # byte-level form of "\n"
    bytes_ = [c for c in _byte_vocab() if c != newline_char]
    tokens = specials + bytes_
    tokens += [f"<unused{i}>" for i in range(OPT_NEWLINE - len(tokens))]
    tokens.append(newline_char)
    tokens += [f"<unused{i}>" for i in range(len(tokens), OPT_IMAGE_TOKEN)]
    tok = _gpt2_tokenizer({t: i for i, t in enumerate(tokens)})
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == OPT_IMAGE_TOKEN
    return tok


def newline_id(tok) -> int:
    ids = tok("\n", add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ModelLoadError(f"the tokenizer splits '\\n' into {len(ids)} tokens; expected one "
                             "(OPT tokenizers map it to id 50118)")
    return ids[0]


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def tiny_config(tok):
    from transformers import Blip2Config, OPTConfig
    # Large random weights so the image moves the logits (see module docstring). These ranges
    # were picked by measuring: 40 distinct synthetic images -> 38-40 distinct greedy captions.
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return Blip2Config(
        vision_config=dict(tiny, image_size=364, patch_size=14, initializer_range=0.5),
        qformer_config=dict(tiny, encoder_hidden_size=32, initializer_range=0.3),
        text_config=OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                              ffn_dim=64, num_attention_heads=2, max_position_embeddings=640,
                              word_embed_proj_dim=32, init_std=1.5, pad_token_id=OPT_PAD,
                              bos_token_id=OPT_BOS, eos_token_id=newline_id(tok)).to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS, initializer_range=0.3,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN))


def full_config():
    """The Salesforce/blip2-opt-2.7b-coco architecture (ViT-g at 364 px, Q-Former, OPT-2.7b)."""
    from transformers import Blip2Config, OPTConfig
    return Blip2Config(
        vision_config=dict(hidden_size=1408, num_hidden_layers=39, num_attention_heads=16,
                           intermediate_size=6144, image_size=364, patch_size=14, qkv_bias=True),
        qformer_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, encoder_hidden_size=1408,
                            cross_attention_frequency=2),
        text_config=OPTConfig(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                              num_attention_heads=32, vocab_size=OPT_VOCAB_ROWS,
                              max_position_embeddings=2048, word_embed_proj_dim=2560,
                              pad_token_id=OPT_PAD, bos_token_id=OPT_BOS,
                              eos_token_id=OPT_NEWLINE).to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS, image_token_index=OPT_IMAGE_TOKEN)


# ----------------------------------------------------------------------------------------------
# builders / loaders
# ----------------------------------------------------------------------------------------------
def _build_random(config, tok, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import Blip2ForConditionalGeneration
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:
        with torch.device(device):
            torch.set_default_dtype(dtype)
            model = Blip2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    # Match from_pretrained: the Q-Former and query tokens stay in float32 (_keep_in_fp32_modules).
    for name in getattr(model, "_keep_in_fp32_modules", None) or []:
        part = getattr(model, name)
        if isinstance(part, torch.nn.Parameter):
            part.data = part.data.float()
        else:
            part.float()
    return model.eval()


def build_tiny(device: torch.device, dtype: torch.dtype) -> LoadedModel:
    tok = tiny_tokenizer()
    model = _build_random(tiny_config(tok), tok, device, dtype, seed=0)
    with torch.no_grad():  # pixels dominate the patch embeddings, not the position embeddings
        model.vision_model.embeddings.patch_embedding.weight.mul_(10.0)
    keep = {tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"}
    keep |= {tok.convert_tokens_to_ids("\u0120"), newline_id(tok)}  # space, "\n"
    # generate() runs the language model's own generate, so its generation config is the one used.
    model.language_model.generation_config.suppress_tokens = [
        i for i in range(len(tok)) if i not in keep]
    return _loaded(model, tok, TINY)


def build_random_full(device: torch.device, dtype: torch.dtype) -> LoadedModel:
    tok = full_vocab_tokenizer()
    return _loaded(_build_random(full_config(), tok, device, dtype, seed=0), tok, RANDOM_FULL)


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
    if old and not problems and m.model_id not in (TINY, RANDOM_FULL):
        raise ModelLoadError(upgrade_message(m.model_id, old))
    if old:
        problems.append(f"it is in the pre-2024 BLIP-2 layout ({old})")
    if problems:
        raise ModelLoadError(f"{m.model_id} is not a usable BLIP-2 captioning checkpoint: "
                             + "; ".join(problems) + ". Re-download it with builder/fetch_model.py.")


def load_model(source: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load or build the model. ``load_s`` excludes the one-off import of transformers."""
    import transformers.models.blip_2.modeling_blip_2  # noqa: F401  (import cost: seconds)
    t0 = time.perf_counter()
    if source == TINY:
        loaded = build_tiny(device, dtype)
    elif source == RANDOM_FULL:
        loaded = build_random_full(device, dtype)
    else:
        loaded = load_pretrained(source, device, dtype)
    loaded.load_s = time.perf_counter() - t0
    return loaded
