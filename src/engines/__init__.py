"""The caption engines: ``load_engine(cfg)`` builds the configured one (``BLIP_ENGINE``).

- ``base``: the interface both engines implement (``BaseEngine``), device and dtype resolution,
  the out-of-memory fallback;
- ``transformers_engine``: the default engine, on Hugging Face transformers;
- ``self_check``: the start-up check of the fast decoder against a reference;
- ``lavis_engine``: ``BLIP_ENGINE=lavis``, on salesforce-lavis (its own environment; imported
  only when configured), with its checkpoint fetching in ``lavis_checkpoints``.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from config import Config
from engines.base import BaseEngine, is_fatal_device_error, resolve_device, resolve_dtype
from engines.transformers_engine import TransformersEngine, decode_options

if TYPE_CHECKING:  # imported where the fast decoder is used
    from generation import DecodeOptions

log = logging.getLogger("blip.engine")


def load_engine(cfg: Config, decode: DecodeOptions | None = None) -> BaseEngine:
    """Build the configured engine, load its model, check its fast decoder
    (``BLIP_SELF_CHECK``, see ``self_check``) and warm it up (``BLIP_WARMUP``).
    ``decode``: the fast decoder's options where they are not ``decode_options``'s, as the
    benchmark's variants have them (the LAVIS engine has no fast decoder)."""
    if cfg.engine == "lavis":
        # separate environment (requirements-lavis.txt)
        from engines.lavis_engine import LavisEngine
        engine: BaseEngine = LavisEngine.load(cfg)
    else:
        engine = TransformersEngine.load(cfg, decode)
    if cfg.self_check:
        from engines import self_check
        engine.self_check = self_check.run(engine)
        log.info("%s", engine.self_check.text)
    if cfg.warmup:
        log.info("warm-up caption in %.2fs", engine.warmup())
    return engine


__all__ = ["BaseEngine", "TransformersEngine", "decode_options", "load_engine",
           "is_fatal_device_error", "resolve_device", "resolve_dtype"]
