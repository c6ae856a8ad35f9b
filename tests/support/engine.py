"""Watching a real engine: ``record_batches`` lists the batch sizes its GPU calls were given.

The out-of-memory fallback promises an order of batch sizes (halve on an out-of-memory error,
down to 1; keep the size that fit), not only a final one: the tests assert that whole order.
"""
from __future__ import annotations


def record_batches(monkeypatch, engine) -> list[int]:
    """Each batch size ``engine.generate_batch`` is called with, in order, failed tries
    included (the engine's real method still runs; injected out-of-memory errors pass
    through)."""
    tried: list[int] = []
    real = engine.generate_batch

    def spy(pixels, prompts, params):
        tried.append(int(pixels.shape[0]))
        return real(pixels, prompts, params)

    monkeypatch.setattr(engine, "generate_batch", spy)
    return tried
