"""The `mullama` command, driven in a pseudo-terminal (pexpect) on the real default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pexpect
import pytest

PYTHON = [sys.executable, "-m", "mullama"]


def spawn(*args: str, **kwargs) -> pexpect.spawn:
    env = dict(os.environ, COLUMNS="100", LINES="40", TERM="xterm-256color")
    return pexpect.spawn(sys.executable, ["-m", "mullama", *args], env=env, encoding="utf-8", timeout=300,
                         dimensions=(40, 100), **kwargs)


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*PYTHON, *args], capture_output=True, text=True, input=input, timeout=300, check=False)


def test_run_streams_before_the_process_ends(model_path):
    child = spawn("run", "-m", str(model_path), "--raw", "-t", "0", "-n", "100", "--stop", "never-appears",
                  "Count from one to a hundred: one, two, three,")
    child.expect(r"four|4")  # the first words of the reply
    assert child.isalive()  # ... arrived while generation was still going
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_run_json_and_piped_stdin(model_path):
    result = run("run", str(model_path), "-n", "12", "-t", "0", "--json", input="Say hello to the world.")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["text"] and data["completion_tokens"] <= 12 and data["tokens_per_second"] > 0


def test_run_prompt_words_around_options(model_path):
    """Options may sit between the words of the prompt, as with `mullama run Why -n 8 is the sky blue`."""
    split = run("run", str(model_path), "Why", "-n", "8", "-t", "0", "is", "the", "sky", "blue?", "--json")
    whole = run("run", str(model_path), "-n", "8", "-t", "0", "--json", "Why is the sky blue?")
    assert split.returncode == 0 and whole.returncode == 0, split.stderr + whole.stderr
    split_data, whole_data = json.loads(split.stdout), json.loads(whole.stdout)
    assert split_data["prompt_tokens"] == whole_data["prompt_tokens"]
    assert split_data["text"] == whole_data["text"] and split_data["text"]
    unknown = run("run", "hi", "--no-such-option", "there")
    assert unknown.returncode == 2 and "--no-such-option" in unknown.stderr


def test_one_line_errors_and_exit_codes():
    bad_arg = run("run", "--max-tokens", "many", "hi")
    assert bad_arg.returncode == 2 and len(bad_arg.stderr.strip().splitlines()) == 1
    unknown = run("run", "nosuch:7b", "hi")
    assert unknown.returncode == 1 and "MODEL_NOT_FOUND" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1 and "Traceback" not in unknown.stderr
    missing = run("chat", "/nowhere/model.gguf")
    assert missing.returncode == 1 and "MODEL_LOAD_ERROR" in missing.stderr
    no_prompt = run("run", input="")
    assert no_prompt.returncode == 1 and "no prompt" in no_prompt.stderr
    for flag, value in (("--ctx-size", "-5"), ("--parallel", "0"), ("--threads", str(2**31))):
        bad_serve = run("serve", flag, value)  # refused before any model is loaded
        assert bad_serve.returncode == 1 and "INVALID_CONFIG" in bad_serve.stderr, bad_serve.stderr
        assert len(bad_serve.stderr.strip().splitlines()) == 1 and "Traceback" not in bad_serve.stderr


def test_chat_two_turns_commands_and_ctrl_c(model_path, tmp_path):
    # (greedy, this model answers the first question with a loop that only max_tokens ends: keep it short)
    child = spawn("chat", str(model_path), "-t", "0", "-n", "120")
    child.expect("Ctrl-D to leave")
    child.expect(">>> ")
    child.sendline("What is the capital of France?")
    child.expect(r"(\d+) tokens · [\d.]+ tokens/s · (\d+) ms to first token · (\d+)/(\d+) prompt tokens cached")
    child.expect(">>> ")
    child.sendline("And of Italy?")
    child.expect(r"tokens/s · \d+ ms to first token · (\d+)/(\d+) prompt tokens cached")
    cached, prompt = int(child.match.group(1)), int(child.match.group(2))
    assert cached > prompt // 2  # the follow-up reused the first turn's cache
    child.expect(">>> ")

    saved = tmp_path / "conversation.json"
    child.sendline(f"/save {saved}")
    child.expect("saved 4 messages")
    child.expect(">>> ")
    assert [m["role"] for m in json.loads(saved.read_text())["messages"]] == ["user", "assistant"] * 2

    child.sendline("/system You are a pirate.")
    child.expect("conversation reset")
    child.expect(">>> ")
    child.sendline(f"/save {saved}")
    child.expect(">>> ")
    data = json.loads(saved.read_text())
    assert data["system"] == "You are a pirate." and data["messages"] == []

    child.sendline("Hello!")
    child.expect("prompt tokens cached")
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect("conversation reset")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r'"messages"\S*: \S*0\b')  # (colours around the JSON in a terminal)
    child.expect(">>> ")

    # Ctrl-C during a long reply stops it and returns to the prompt; the model still answers.
    child.sendline("/load " + str(saved))
    child.expect(">>> ")
    child.sendline("Write a very long story about the sea, with many chapters.")
    child.expect_exact("chapters.\r\n")  # our own line, echoed
    child.expect(r"\w+ \w+ \w+")  # the reply has started
    child.sendintr()
    child.expect("stopped")
    child.expect(">>> ")
    child.sendline("Say hi.")
    child.expect("prompt tokens cached")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_with_piped_input_writes_plain_text(model_path, tmp_path):
    record = tmp_path / "chat.svg"
    result = run("chat", str(model_path), "-t", "0", "-n", "20", "--record", str(record),
                 input="Hello!\n/help\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout  # plain text when not a terminal
    assert "/system TEXT" in result.stdout and "tokens/s" in result.stdout
    assert record.read_text().startswith("<svg")


@pytest.mark.parametrize("command", [["info"], ["info", "--json"], ["bench", "-n", "16"], ["--help"],
                                     ["run", "--help"], ["serve", "--help"]])
def test_other_commands(command, model_path):
    result = run(*command)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
