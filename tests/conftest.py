"""Shared fixtures: thin wrappers around testlib (put the logic in testlib.py)."""
from __future__ import annotations

import pytest

import testlib


@pytest.fixture(scope="session")
def _local_server():
    with testlib.LocalServer() as server:
        yield server


@pytest.fixture
def http_server(_local_server, monkeypatch):
    """The session's local HTTP server, routes and counters cleared, private URLs allowed."""
    testlib.allow_private_urls(monkeypatch)
    _local_server.reset()
    return _local_server
