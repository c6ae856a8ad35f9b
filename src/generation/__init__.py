"""Fast caption decoding for BLIP-2 OPT decoders (``graphs`` holds it until it is split)."""
from .graphs import FastGenerator, supports

__all__ = ["FastGenerator", "supports"]
