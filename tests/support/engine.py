"""Watching a real engine: ``record_batches`` lists the batch sizes its GPU calls were given,
``record_token_rows`` the token ids of each caption it decodes (``caption_token_count`` counts
them as ``max_length`` and ``min_length`` do).

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


def record_token_rows(monkeypatch, engine) -> list[list[int]]:
    """The new token ids of every caption the transformers engine decodes into text, in order
    (each row as its decoder returned it: eos, then padding, where it stopped early)."""
    rows: list[list[int]] = []
    real = engine._decode

    def spy(seq):
        rows.append(list(seq))
        return real(seq)

    monkeypatch.setattr(engine, "_decode", spy)
    return rows


def caption_token_count(row: list[int], eos: int) -> int:
    """How many new tokens a row's caption has: those before its eos (all, without one)."""
    return row.index(eos) if eos in row else len(row)
