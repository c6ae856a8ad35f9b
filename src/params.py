"""Generation parameters: the part of a request that decides how captions are generated.

Shared by the schema (which validates the request and builds a ``GenerationParams``) and the
engines (which honour it). ``GenerationParams`` is frozen and hashable: images of different jobs
ride in the same GPU batch only when their params are equal. The prompt is per image (rows are
left-padded) and so is not part of it.

Semantics (both engines): ``max_length`` / ``min_length`` count new caption tokens only (the
prompt is not counted); eos is the "\\n" token; with ``use_nucleus_sampling`` one beam is used.

What comes back: a ``CaptionResult`` per image (its captions, or a per-image error), and
``compose`` makes the caption a user sees from the prompt and the continuation.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

DEFAULT_PROMPT = "a photo of"


@dataclass(frozen=True)
class GenerationParams:
    num_beams: int = 3
    max_length: int = 50
    min_length: int = 5
    use_nucleus_sampling: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    num_captions: int = 1

    def normalized(self) -> "GenerationParams":
        """The same generation with the settings it ignores at their defaults, so that jobs
        which generate identically compare equal and share GPU batches: sampling ignores
        ``num_beams`` and ``length_penalty``; beam search / greedy ignore ``top_p`` and
        ``temperature``."""
        base = GenerationParams()
        if self.use_nucleus_sampling:
            return replace(self, num_beams=1, length_penalty=base.length_penalty)
        return replace(self, top_p=base.top_p, temperature=base.temperature)

    @property
    def effective_beams(self) -> int:
        """Beams actually searched: sampling forces one beam (LAVIS behaviour)."""
        return 1 if self.use_nucleus_sampling else self.num_beams

    @property
    def sequences_per_image(self) -> int:
        """Rows the decoder carries per image; sizes the KV cache and memory per image."""
        return max(self.effective_beams, self.num_captions)


@dataclass
class CaptionResult:
    captions: list[str] = field(default_factory=list)  # num_captions strings, best first
    error: str | None = None

    @property
    def caption(self) -> str | None:
        return self.captions[0] if self.captions else None


def compose(prompt: str, continuation: str, include_prompt: bool) -> str:
    """The caption a user sees: the continuation, or prompt + continuation."""
    if not include_prompt:
        return continuation
    return f"{prompt.strip()} {continuation}".strip()
