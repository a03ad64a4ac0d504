"""Shared fixtures: the real library, the real default model, real upstream tools."""

from __future__ import annotations

import pytest
import upstream

import mullama
from mullama import _hub
from mullama._context import default_threads


@pytest.fixture(scope="session")
def build():
    """The cached default build of llama.cpp with upstream's tools (built once if missing)."""
    return upstream.build_with_tools()


@pytest.fixture(scope="session")
def model_path():
    """The default model, fetched and verified by mullama's own download helper."""
    return _hub.resolve(_hub.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def model(model_path):
    with mullama.Model.load(model_path) as loaded:
        yield loaded


@pytest.fixture()
def context(model):
    ctx = mullama.Context(model, n_ctx=4096)
    yield ctx
    ctx.close()


@pytest.fixture(scope="session")
def llama_server(build, model_path):
    """Upstream llama-server from the pin, same build, same threads, on 127.0.0.1."""
    server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads())
    yield server
    server.close()
