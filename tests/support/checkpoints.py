"""Checkpoints saved to disk in the real layout, loaded through ``BLIP_MODEL=<dir>`` as a user's
model is (``modeling.load_model``: ``from_pretrained`` of the model and the tokenizer).

``save_chatty(dir)``: the tiny random BLIP-2 (``testing_models.build_tiny``'s weights) changed so
that it can show what ``tiny-random`` hides:

- nothing is suppressed: ``tiny-random`` lets only ``a``-``z``, space and eos through its
  generation config, so a score given to ``<pad>`` (the left padding of a batch whose prompts
  differ in length) never mattered. Here ``<pad>``'s embedding row (tied to the output layer)
  is the space token's plus noise, so ``<pad>`` is often among the best candidates and its
  score decides captions;
- eos is likely (its row doubled), so captions end at very different lengths (1 to 20 tokens
  on ``distinct_images``): finished beams, finished rows beside running ones, early stops.

A generation config set in code on the language model does not survive ``save_pretrained``
(transformers 5 rebuilds it from the text config when loading), so none is relied on here.

``PROMPTS`` (empty to six words: a batch of them is left-padded) and ``MIXES`` (generation
parameters over the request's whole space) are what the decoder and engine tests run on it.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

import testing_models
from params import GenerationParams

PROMPTS = ["", "a", "a photo", "a photo of", "an image showing the", "one two three four five six"]

EOS_SCALE = 2.0
PAD_NOISE = 0.3


def chatty(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
    """The chatty model in memory (a ``modeling.LoadedModel``), before it is saved."""
    loaded = testing_models.build_tiny(device, dtype)
    tok, lm = loaded.tokenizer, loaded.model.language_model
    lm.generation_config.suppress_tokens = None
    rows = lm.model.decoder.embed_tokens.weight
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        space = rows[tok.convert_tokens_to_ids("\u0120")].clone()
        rows[loaded.pad_token_id] = space + PAD_NOISE * torch.randn(
            rows.shape[1], generator=noise).to(rows)
        rows[loaded.eos_token_id] *= EOS_SCALE
    return loaded


def save_chatty(directory: str | Path) -> Path:
    """Save the chatty model and its tokenizer in the Hugging Face layout; returns the path."""
    directory = Path(directory)
    loaded = chatty()
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


def _mixes(count: int = 30, seed: int = 20) -> list[GenerationParams]:
    """Beams 1-10 (each three times), num_captions up to the beams, every kind of repetition
    penalty, length penalties from -5 to 5, min_length from 0 up to max_length."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        beams = 1 + i % 10
        max_length = rng.randint(3, 20)
        min_length = rng.choice([0, rng.randint(0, max_length), max_length - 1, max_length])
        out.append(GenerationParams(
            num_beams=beams, max_length=max_length, min_length=min_length,
            num_captions=rng.randint(1, beams), repetition_penalty=rng.choice([1.0, 1.2, 2.0, 5.0]),
            length_penalty=rng.choice([-5.0, -2.0, -0.5, 0.0, 0.5, 1.0, 2.0, 5.0])))
    return out


MIXES = _mixes()


def mix_id(p: GenerationParams) -> str:
    """A test id naming the mix's parameters."""
    return (f"b{p.num_beams}n{p.num_captions}-len{p.min_length}-{p.max_length}"
            f"-rep{p.repetition_penalty:g}-lp{p.length_penalty:g}")
