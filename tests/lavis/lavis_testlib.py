"""Support for the BLIP_ENGINE=lavis tests (run in .venv-lavis by `make test-lavis`).

- ``tiny_cfg(**env)``: a Config for the tiny LAVIS model plus extra settings.
- ``sharing(engine, **env)``: another LavisEngine on the same loaded model, other settings.
- ``pictures(n)``: n distinct pictures (support.images.picture, as the transformers tests).
- ``GenerateRecorder``: records what LAVIS's OPT ``generate`` returned, to count new tokens
  exactly (the tiny tokenizer is byte level: one character per token, but captions are stripped).
"""
from __future__ import annotations

import torch

from config import Config
from engines.lavis_engine import LavisEngine
from support import images as pics


def tiny_cfg(**env: str) -> Config:
    return Config.from_env({"BLIP_ENGINE": "lavis", "BLIP_MODEL": "tiny-random", **env})


def sharing(engine: LavisEngine, **env: str) -> LavisEngine:
    return LavisEngine(tiny_cfg(**env), engine.device, engine.dtype, engine.model,
                       engine.vis_processor, engine.model_id, engine.image_size)


def pictures(n: int, start: int = 0):
    return [pics.picture(seed) for seed in range(start, start + n)]


def captions(results) -> list[str]:
    assert all(r.error is None for r in results), [r.error for r in results]
    return [r.caption for r in results]


class GenerateRecorder:
    """While active, records each output of ``model.opt_model.generate`` (LAVIS's call)."""

    def __init__(self, model):
        self.model = model
        self.outputs: list[torch.Tensor] = []
        self.prompt_lengths: list[int] = []

    def __enter__(self):
        opt = self.model.opt_model
        original = opt.generate

        def generate(*args, **kwargs):
            out = original(*args, **kwargs)
            self.outputs.append(out)
            self.prompt_lengths.append(kwargs["input_ids"].shape[1])
            return out

        opt.generate = generate
        return self

    def __exit__(self, *exc):
        del self.model.opt_model.generate  # back to the class's method

    def new_token_counts(self) -> list[int]:
        """Per returned sequence, the tokens generated before eos or padding."""
        stop = {self.model.eos_token_id, self.model.opt_tokenizer.pad_token_id}
        counts = []
        for out, start in zip(self.outputs, self.prompt_lengths):
            for row in out[:, start:].tolist():
                counts.append(next((i for i, t in enumerate(row) if t in stop), len(row)))
        return counts
