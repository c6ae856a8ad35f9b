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
