"""What the `mullama` command says when it refuses or cuts short: names resolved as every command resolves
them, advice in the command's own terms (its flags and commands, not the Python API's), and one format
for every error, usage errors included: `mullama: error [CODE]: message`, exit code 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from mullama.hub import _cache, _catalog, _pull

ERROR = "mullama: error [{}]: "


def mullama_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mullama", *args], capture_output=True, text=True, timeout=300,
                          check=False, env=env)


def one_error(result: subprocess.CompletedProcess, code: str) -> str:
    """The message of the one-line error ``result`` ended with (exit code 1, code ``code``)."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR.format(code)), result.stderr
    return lines[0][len(ERROR.format(code)):]


@pytest.fixture()
def scratch_home(tmp_path, monkeypatch):
    """A MULLAMA_HOME of its own holding a copy of the real all-minilm:l6-v2 (the real cache is never touched)."""
    source = _pull.resolve("all-minilm:l6-v2")  # the real cache's copy (already pulled)
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path / "home"))
    entry = _catalog.entry_for("all-minilm:l6-v2")
    target = _cache.model_path(entry)
    target.parent.mkdir(parents=True)
    shutil.copyfile(source, target)
    assert _pull.pull("all-minilm:l6-v2") == target  # indexes the verified copy: nothing is downloaded
    return dict(os.environ), target


def test_rm_takes_a_name_without_its_tag_as_show_does(scratch_home):
    env, target = scratch_home
    shown = mullama_cli("show", "all-minilm", "--json", env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["path"] == str(target), shown.stderr
    removed = mullama_cli("rm", "all-minilm", env=env)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith("removed all-minilm (")
    assert not target.exists() and json.loads(mullama_cli("list", "--json", env=env).stdout) == []
    again = one_error(mullama_cli("rm", "all-minilm", env=env), "MODEL_NOT_FOUND")
    assert "not in the cache" in again


def test_show_suggests_pull_only_for_names_the_catalog_knows(scratch_home):
    env, _ = scratch_home
    unknown = one_error(mullama_cli("show", "nosuch", env=env), "MODEL_NOT_FOUND")
    assert "mullama pull" not in unknown
    assert "Known models: " in unknown and "smollm2:135m" in unknown and ".gguf" in unknown
    known = one_error(mullama_cli("show", "qwen2.5", env=env), "MODEL_NOT_FOUND")  # in the catalog, not pulled
    assert "`mullama pull qwen2.5` downloads it" in known


@pytest.mark.parametrize(("args", "named"), [
    (["run", "--bogus", "hi"], "unrecognized arguments: --bogus (see mullama run --help)"),
    (["run", "-n", "abc", "hi"], "-n/--max-tokens"),
    (["bench", "-n", "abc"], "-n/--tokens"),
    (["nosuch"], "invalid choice: 'nosuch'"),
])
def test_usage_errors_are_one_line_with_a_code_and_exit_1(args, named):
    """A script tells every failure by exit code 1 and `[CODE]`, a usage error as any other."""
    assert named in one_error(mullama_cli(*args), "INVALID_CONFIG")


@pytest.mark.parametrize(("args", "flag"), [
    (["run", "-n", "0", "hi"], "-n/--max-tokens must be"),
    (["run", "--temp", "-1", "hi"], "--temp must be"),
    (["bench", "-n", "0"], "-n/--tokens must be"),
])
def test_sampling_errors_name_the_flag_not_stream_config(args, flag):
    message = one_error(mullama_cli(*args), "INVALID_CONFIG")
    assert message.startswith(flag) and "StreamConfig" not in message


@pytest.mark.parametrize("value", ["0", "-5", "100"])
def test_a_context_size_below_256_says_256(value):
    message = one_error(mullama_cli("run", "-c", value, "hi"), "INVALID_CONFIG")
    assert message.startswith(f"--ctx-size must be at least 256 tokens, not {value}")


@pytest.mark.parametrize("command", [["run", "all-minilm", "hi"], ["bench", "all-minilm"]])
def test_an_embedding_model_points_to_mullama_embed(command):
    message = one_error(mullama_cli(*command), "INVALID_CONFIG")
    assert "is an embedding model" in message and "`mullama embed all-minilm:l6-v2 TEXT...`" in message
    assert "model.embed" not in message


def test_a_prompt_longer_than_the_context_names_ctx_size(model_path):
    message = one_error(mullama_cli("run", str(model_path), "-c", "256", "word " * 400), "CONTEXT_OVERFLOW")
    assert "but the context holds 256" in message and "-c/--ctx-size" in message
    assert "n_ctx" not in message and "Context" not in message


def test_an_embed_text_longer_than_the_batch_names_the_embed_flags():
    """The overflow advice is the command's own: embed has no -c, but --batch-size and --truncate."""
    message = one_error(mullama_cli("embed", "all-minilm", "a rather long text of many words", "--batch-size", "4"),
                        "CONTEXT_OVERFLOW")
    assert "an embedding batch holds 4" in message and "--batch-size" in message and "--truncate" in message
    assert "ctx-size" not in message and "truncate=True" not in message


def test_a_reply_cut_by_the_full_context_is_not_labelled_max_tokens(model_path):
    """README: `… (max tokens)` is for a reply cut by -n; one that filled the context says so instead."""
    full = mullama_cli("run", str(model_path), "-c", "256", "-n", "100000", "--temp", "0", "--raw",
                       "Count from one to a thousand: one, two, three,")
    assert full.returncode == 0, full.stderr
    assert "(context full: 256 tokens" in full.stderr and "max tokens" not in full.stderr
    assert full.stdout.strip() and "context full" not in full.stdout  # a pipe gets the reply alone
    cut = mullama_cli("run", str(model_path), "-c", "256", "-n", "4", "--temp", "0", "--raw",
                      "Count from one to a thousand: one, two, three,")
    assert cut.returncode == 0 and "… (max tokens)" in cut.stderr and "context full" not in cut.stderr
