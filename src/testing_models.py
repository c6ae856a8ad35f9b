"""Models built in code, for tests, offline runs and benchmarks: no files, no network, fixed seeds.
The worker imports this module only when ``BLIP_MODEL`` names one of them.

Transformers engine (``load_model``):

- ``tiny-random``: a tiny BLIP-2 built in code (364 px ViT with patch 14 but tiny widths,
  Q-Former with 32 query tokens, tiny OPT) and a byte-level tokenizer built locally. No files,
  no network, fixed seed. Its weights are drawn large enough that distinct images give distinct
  captions, and its generation config suppresses every token but ``a``-``z`` and space, so its
  captions are readable nonsense ("qv dxe lkz") instead of control bytes.
- ``random-full``: the real architecture with random weights (the real checkpoint's compute),
  built directly on the target device in the target dtype; for GPU benchmarks.

LAVIS engine (``BLIP_ENGINE=lavis BLIP_MODEL=tiny-random``): a tiny LAVIS ``blip2_opt`` that builds
offline.

It runs LAVIS's own code end to end: the real ``caption_coco_opt2.7b`` yaml (only ``opt_model``,
``load_finetuned`` and ``pretrained`` overridden), ``load_model_and_preprocess`` (registered
under the model type ``tiny-random``), ``vis_processors["eval"]`` and ``Blip2OPT.generate``,
all unchanged. Three things LAVIS would download are substituted while it loads:

- ``opt_model``: a local directory with a tiny OPT (32 wide, 2 layers) and a slow, byte-level
  GPT2 tokenizer (no merges: one character is one token, so lengths are easy to test);
- ``bert-base-uncased`` (hard-coded in ``lavis.models.blip2_models.blip2`` for the Q-Former's
  tokenizer, config and weights): redirected to a local tiny BERT directory;
- ``create_eva_vit_g`` (always the 1408-wide ViT-g, downloaded): a tiny
  ``lavis.models.eva_vit.VisionTransformer`` with the same patch size 14, built at 364 px.

The ViT, Q-Former, query tokens and projection come from a LAVIS-format checkpoint
(``{"model": state_dict}``, without the frozen OPT, like LAVIS's released files). Every weight
matrix is drawn with a large std (``VISION_STD``, ``OPT_STD``) under a fixed seed so that distinct
images give distinct captions; the tiny OPT's config lists every token but ``a``-``z``, space
and the "\\n" eos in ``suppress_tokens``, which LAVIS's unchanged ``generate`` honours, so
captions read as lowercase nonsense ("kq zvd ...").

The artifacts (about 1 MB) are built once, in seconds, into
``$XDG_CACHE_HOME/blip2-worker/lavis-tiny-<VERSION>`` (``~/.cache`` when unset). ``VERSION`` is a
hash of this file, so any change to the builder builds afresh. Needs the LAVIS environment
(requirements-lavis.txt).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Iterator

import torch

from modeling import (IMAGE_TOKEN, NUM_QUERY_TOKENS, RANDOM_FULL, TINY, LoadedModel, _loaded,
                      newline_id)

# OPT ids (facebook/opt-*): <s>=0 <pad>=1 </s>=2 (OPT's BOS is </s>), "\n" = 50118, and the HF
# BLIP-2 OPT checkpoints add "<image>" as 50265 in a 50304-row (padded) embedding.
OPT_PAD, OPT_BOS = 1, 2
OPT_NEWLINE = 50118
OPT_IMAGE_TOKEN = 50265
OPT_VOCAB_ROWS = 50304


# ==============================================================================================
# transformers engine: tiny-random and random-full
# ==============================================================================================

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


def load_model(name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Build ``tiny-random`` or ``random-full`` as ``modeling.load_model`` loads a checkpoint:
    ``load_s`` excludes the one-off import of transformers."""
    import transformers.models.blip_2.modeling_blip_2  # noqa: F401  (import cost: seconds)
    t0 = time.perf_counter()
    loaded = {TINY: build_tiny, RANDOM_FULL: build_random_full}[name](device, dtype)
    loaded.load_s = time.perf_counter() - t0
    return loaded


# ==============================================================================================
# LAVIS engine: tiny-random
# ==============================================================================================

VERSION = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]
MODEL_TYPE = "tiny-random"  # the LAVIS model type the tiny yaml is registered under
REAL_MODEL_TYPE = "caption_coco_opt2.7b"
BERT_REPO = "bert-base-uncased"
# Large random weights so that the image moves the logits. Measured on 40 distinct pictures
# (support.images.picture), greedy and beams 3, prompt "a photo of" and "": seeds 1, 3, 4 and 8 give 40
# distinct captions in all four cases, most others 36-40, seed 0 only 9-24 (its OPT ignores
# the image); softer OPT attention (smaller std) makes every seed worse.
SEED = 4
VISION_STD = 1.0  # ViT, Q-Former, query tokens, projection (the checkpoint)
OPT_STD = 1.0  # the tiny OPT
WIDTH = 32
LAYERS = 2
HEADS = 2
CAPTION_CHARS = "abcdefghijklmnopqrstuvwxyz "
# 32 query embeddings + BOS + the longest prompt (300 characters = 300 byte tokens) + the
# longest caption (200 new tokens) the request schema allows, with room to spare.
MAX_POSITIONS = 640
_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's ids 0-3; OPT's BOS is </s>


class TinyArtifacts:
    """Paths of the files the tiny model is built from, under one directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.opt_dir = self.root / "tiny-opt"
        self.bert_dir = self.root / "tiny-bert"
        self.checkpoint = self.root / "tiny_blip2_caption_opt.pth"
        self.yaml = self.root / "blip2_caption_opt_tiny.yaml"
        self.stamp = self.root / "complete"

    def complete(self) -> bool:
        return self.stamp.is_file()


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blip2-worker" / f"lavis-tiny-{VERSION}"


def ensure_artifacts(root: str | os.PathLike | None = None) -> TinyArtifacts:
    """Build the tiny artifacts under ``root`` (default ``cache_root()``) unless already there.

    Built in a sibling temporary directory and renamed into place, so a reader never sees half
    a build and two processes building at once both end up with a complete directory."""
    art = TinyArtifacts(Path(root) if root else cache_root())
    if art.complete():
        return art
    art.root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=art.root.name + ".building-", dir=art.root.parent))
    try:
        _build_artifacts(TinyArtifacts(tmp), final=art)
        try:
            os.replace(tmp, art.root)
        except OSError:
            if not art.complete():  # not another process's finished build: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return art


# ----------------------------------------------------------------------------------------------
# substitutions while LAVIS loads
# ----------------------------------------------------------------------------------------------
class _RedirectBert:
    """Stands in for a transformers class in LAVIS's blip2 module: ``from_pretrained`` of
    ``bert-base-uncased`` reads the local tiny BERT instead; everything else is unchanged."""

    def __init__(self, cls, local_dir: Path):
        self._cls = cls
        self._local = str(local_dir)

    def from_pretrained(self, name, *args, **kwargs):
        return self._cls.from_pretrained(self._local if name == BERT_REPO else name,
                                         *args, **kwargs)


def _tiny_eva_vit(img_size=224, drop_path_rate=0.0, use_checkpoint=False, precision="fp32"):
    """``create_eva_vit_g``'s signature and class (patch 14, no mean pooling), tiny widths and
    no download. ``precision`` is ignored: LAVIS only converts ViT-g to fp16 for "fp16", and the
    caption yaml asks for fp32."""
    from lavis.models.eva_vit import VisionTransformer
    return VisionTransformer(img_size=img_size, patch_size=14, use_mean_pooling=False,
                             embed_dim=WIDTH, depth=LAYERS, num_heads=HEADS, mlp_ratio=2.0,
                             qkv_bias=True, drop_path_rate=drop_path_rate,
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                             use_checkpoint=use_checkpoint)


@contextlib.contextmanager
def _swapped(obj, **attrs) -> Iterator[None]:
    saved = {name: getattr(obj, name) for name in attrs}
    try:
        for name, value in attrs.items():
            setattr(obj, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


@contextlib.contextmanager
def substitutions(art: TinyArtifacts) -> Iterator[None]:
    """While active, LAVIS's BLIP-2 builds with the tiny BERT and the tiny ViT."""
    import lavis.models.blip2_models.blip2 as blip2
    with _swapped(blip2, create_eva_vit_g=_tiny_eva_vit,
                  BertTokenizer=_RedirectBert(blip2.BertTokenizer, art.bert_dir),
                  BertConfig=_RedirectBert(blip2.BertConfig, art.bert_dir),
                  BertLMHeadModel=_RedirectBert(blip2.BertLMHeadModel, art.bert_dir)):
        yield


@contextlib.contextmanager
def registered(root: str | os.PathLike | None = None) -> Iterator[str]:
    """Ensure the artifacts, substitute the downloads and register the tiny yaml as a
    ``blip2_opt`` model type; yields that type for ``load_model_and_preprocess``."""
    from lavis.models.blip2_models.blip2_opt import Blip2OPT
    art = ensure_artifacts(root)
    types = Blip2OPT.PRETRAINED_MODEL_CONFIG_DICT
    # default_config_path joins LAVIS's root with this path: an absolute path wins the join.
    with _swapped(Blip2OPT, PRETRAINED_MODEL_CONFIG_DICT={**types, MODEL_TYPE: str(art.yaml)}):
        with substitutions(art):
            yield MODEL_TYPE


# ----------------------------------------------------------------------------------------------
# building the artifacts
# ----------------------------------------------------------------------------------------------
def _build_artifacts(art: TinyArtifacts, final: TinyArtifacts) -> None:
    """Write everything into ``art`` (paths inside files point at ``final``)."""
    torch.manual_seed(SEED)
    eos_id = _write_opt(art.opt_dir)
    _write_bert(art.bert_dir)
    _write_checkpoint(art)
    _write_yaml(art, final)
    art.stamp.write_text(json.dumps({"version": VERSION, "seed": SEED, "eos_id": eos_id}))


def _write_opt(out: Path) -> int:
    """Tiny OPT + slow byte-level GPT2 tokenizer, saved like a hub repo. Returns the eos id."""
    from transformers import GPT2Tokenizer, OPTConfig, OPTForCausalLM
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
    out.mkdir(parents=True)
    byte_chars = bytes_to_unicode()  # byte -> printable char used in the vocab
    vocab = {tok: i for i, tok in enumerate(list(_SPECIALS) + list(byte_chars.values()))}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tok = GPT2Tokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                            bos_token="</s>", eos_token="</s>", unk_token="</s>",
                            pad_token="<pad>", add_bos_token=True)
        tok.save_pretrained(str(out))
    eos_id = vocab[byte_chars[ord("\n")]]  # LAVIS: eos = the "\n" token
    keep = {vocab[byte_chars[ord(c)]] for c in CAPTION_CHARS} | {eos_id}
    config = OPTConfig(vocab_size=len(vocab), hidden_size=WIDTH, num_hidden_layers=LAYERS,
                       ffn_dim=2 * WIDTH, num_attention_heads=HEADS,
                       max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=WIDTH,
                       init_std=OPT_STD, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                       suppress_tokens=[i for i in range(len(vocab)) if i not in keep])
    OPTForCausalLM(config).save_pretrained(str(out))
    return eos_id


def _write_bert(out: Path) -> None:
    """Tiny stand-in for bert-base-uncased: the Q-Former's config, tokenizer and weights."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer
    out.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of"]
    (out / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(out / "vocab.txt")).save_pretrained(str(out))
    BertForMaskedLM(BertConfig(vocab_size=len(words), hidden_size=WIDTH,
                               num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               intermediate_size=2 * WIDTH)).save_pretrained(str(out))


def _write_checkpoint(art: TinyArtifacts) -> None:
    """A LAVIS-format checkpoint of the trainable parts, drawn large so images matter."""
    from lavis.models.blip2_models.blip2_opt import Blip2OPT
    with substitutions(art):
        model = Blip2OPT(vit_model="eva_clip_g", img_size=364, vit_precision="fp32",
                         freeze_vit=False, num_query_token=32, opt_model=str(art.opt_dir))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and not name.startswith("opt_model."):
                param.normal_(0.0, VISION_STD)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("opt_model.")}
    torch.save({"model": state}, art.checkpoint)


def _write_yaml(art: TinyArtifacts, final: TinyArtifacts) -> None:
    """The real caption_coco_opt2.7b yaml with only the three overrides."""
    from lavis.models.blip2_models.blip2_opt import Blip2OPT
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(Blip2OPT.default_config_path(REAL_MODEL_TYPE))
    cfg.model.opt_model = str(final.opt_dir)
    cfg.model.load_finetuned = False  # -> load_from_pretrained(cfg.model.pretrained)
    cfg.model.pretrained = str(final.checkpoint)
    OmegaConf.save(cfg, art.yaml)
