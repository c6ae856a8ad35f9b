"""Shared fixtures: thin wrappers around tests/support (put the logic there)."""
from __future__ import annotations

import pytest

from support import web


@pytest.fixture(scope="session")
def _local_server():
    with web.LocalServer() as server:
        yield server


@pytest.fixture
def http_server(_local_server, monkeypatch):
    """The session's local HTTP server, routes and counters cleared, private URLs allowed."""
    web.allow_private_urls(monkeypatch)
    _local_server.reset()
    return _local_server


@pytest.fixture(scope="session")
def chatty_dir(tmp_path_factory):
    """A tiny checkpoint on disk that suppresses nothing and ends captions early
    (``support.checkpoints.save_chatty``): load it with ``BLIP_MODEL=<this dir>``."""
    from support import checkpoints
    return checkpoints.save_chatty(tmp_path_factory.mktemp("chatty"))
