"""Shared fixtures: the real library, the real default model, real upstream tools."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# `python -m pytest` puts the working directory first on sys.path: drop the repository root, so
# that the installed mullama is tested (the root is appended again for build_llama, after it).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
sys.path.insert(0, str(REPO / "stress"))  # leaks, soak_server

import pytest
import upstream

# Child Pythons (`python -m mullama`, `python -c`) started from the repository must import the
# installed mullama too, not the source tree in their working directory (Python >= 3.11).
os.environ["PYTHONSAFEPATH"] = "1"

# One compute thread for every context of the suite, ours and upstream's references alike (they
# take default_threads()), unless the runner chose a count. On a 2-core machine that another job
# keeps busy, two threads wait on each other at every graph step: a token took seconds and the
# docs' 30 s stream timeouts ran out (docs/troubleshooting.md). Greedy output equals upstream's
# for the same count; tests of other counts (test_threads) name them.
os.environ.setdefault("MULLAMA_THREADS", "1")

# A runner started in the background by a shell without job control (`.ci/run &`) ignores SIGINT, and
# so would every child: the Ctrl-C tests (a chat reply, an interrupted build) need it delivered.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import mullama
from mullama.generate._context import default_threads
from mullama.hub import _catalog, _pull


@pytest.fixture(scope="session")
def build():
    """The cached default build of llama.cpp with upstream's tools (built once if missing)."""
    return upstream.build_with_tools()


@pytest.fixture(scope="session")
def model_path():
    """The default model, fetched and verified by mullama's own download helper."""
    return _pull.resolve(_catalog.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def model(model_path):
    with mullama.Model.load(model_path) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def draft_model(tmp_path_factory, model_path):
    """SmolLM2 requantised to Q2_K by tools/make_draft_model.py: the same vocabulary, smaller weights."""
    import subprocess

    out = tmp_path_factory.mktemp("draft") / "draft.gguf"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_draft_model.py"), str(out), "--for", str(model_path)],
                   check=True, capture_output=True, timeout=300)
    with mullama.Model.load(out) as loaded:
        yield loaded


@pytest.fixture()
def context(model):
    ctx = mullama.Context(model, n_ctx=4096)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def served(model):
    """The real server app for the default model, in this process (2 streams of 2048 tokens)."""
    from inprocess_server import serving

    with serving(model, parallel=2, n_ctx=2048) as (server, _engine):
        yield server


@pytest.fixture(scope="session")
def llama_server(build, model_path):
    """Upstream llama-server from the pin, same build, same threads, on 127.0.0.1."""
    server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads())
    yield server
    server.close()


@pytest.fixture(scope="module")
def qwen_template(build):
    """Upstream's Qwen 2.5 chat template from the pinned tree (it describes tools)."""
    return upstream.template_path(build, "Qwen-Qwen2.5-7B-Instruct.jinja")


@pytest.fixture(scope="module")
def qwen_served(model_path, qwen_template):
    """The real server app for the default model with the Qwen 2.5 template (it writes tool calls), in
    this process (1 stream of 2048 tokens, served as "m")."""
    from inprocess_server import serving

    from mullama.server import ServerSettings

    with mullama.Model.load(model_path, chat_template=qwen_template) as loaded, \
            serving(loaded, settings=ServerSettings(model_name="m"), parallel=1, n_ctx=2048) as (server, _engine):
        yield server


@pytest.fixture(scope="module")
def qwen_server(build, model_path, qwen_template):
    """llama-server on the default model with the Qwen 2.5 template (--jinja --chat-template-file)."""
    server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(),
                                  extra=("--jinja", "--chat-template-file", str(qwen_template)))
    yield server
    server.close()
