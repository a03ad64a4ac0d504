"""The `mullama` command, driven in a pseudo-terminal (pexpect) on the real default model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pexpect
import pytest

PYTHON = [sys.executable, "-m", "mullama"]


def spawn(*args: str, **kwargs) -> pexpect.spawn:
    env = dict(os.environ, COLUMNS="100", LINES="40", TERM="xterm-256color")
    return pexpect.spawn(sys.executable, ["-m", "mullama", *args], env=env, encoding="utf-8", timeout=300,
                         dimensions=(40, 100), **kwargs)


def end_chat(child: pexpect.spawn, *expected_on_the_way_out: str) -> None:
    """End a chat with Ctrl-D: it prints ``expected_on_the_way_out``, then exits 0."""
    child.sendeof()
    for text in expected_on_the_way_out:
        child.expect(text)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*PYTHON, *args], capture_output=True, text=True, input=input, timeout=300, check=False)


def test_run_streams_before_the_process_ends(model_path):
    child = spawn("run", "-m", str(model_path), "--raw", "--temp", "0", "-n", "100", "--stop", "never-appears",
                  "Count from one to a hundred: one, two, three,")
    child.expect(r"four|4")  # the first words of the reply
    assert child.isalive()  # ... arrived while generation was still going
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_run_json_and_piped_stdin(model_path):
    result = run("run", str(model_path), "-n", "12", "--temp", "0", "--json", input="Say hello to the world.")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["text"] and data["completion_tokens"] <= 12 and data["tokens_per_second"] > 0


def test_run_prompt_words_around_options(model_path):
    """Options may sit between the words of the prompt, as with `mullama run Why -n 8 is the sky blue`."""
    split = run("run", str(model_path), "Why", "-n", "8", "--temp", "0", "is", "the", "sky", "blue?", "--json")
    whole = run("run", str(model_path), "-n", "8", "--temp", "0", "--json", "Why is the sky blue?")
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
    child = spawn("chat", str(model_path), "--temp", "0", "-n", "120")
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
    end_chat(child)


def test_chat_with_piped_input_writes_plain_text(model_path, tmp_path):
    record = tmp_path / "chat.svg"
    result = run("chat", str(model_path), "--temp", "0", "-n", "20", "--record", str(record),
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


# --- one vocabulary of flags (llama.cpp's), names, prompts --------------------------------------------
def test_llama_cpp_flags_are_understood(model_path, tmp_path):
    """-t is threads (as in llama.cpp and `serve`/`bench`), --temp the temperature; the sampling flags,
    -c, -s, -sys and -f work in `run`; the JSON reports what was generated."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Name a colour.")
    result = run("run", str(model_path), "-f", str(prompt), "-t", "1", "--temp", "0", "-c", "512", "-s", "7",
                 "--top-k", "5", "--top-p", "0.9", "--min-p", "0.1", "--repeat-penalty", "1.1",
                 "-sys", "Answer in one word.", "-n", "6", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["completion_tokens"] <= 6 and data["prompt_tokens"] > 10  # system message + prompt file
    for flags in (["-c", "100"], ["-f", str(tmp_path / "missing.txt")], ["--temp", "hot"]):
        bad = run("run", str(model_path), *flags, "hi")
        assert bad.returncode in (1, 2) and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert "Traceback" not in bad.stderr


def test_a_model_name_without_its_tag_and_stdin_joined_to_the_prompt(model_path):
    alone = run("run", "smollm2", "--temp", "0", "-n", "4", "--json", "Summarise:", input="")
    joined = run("run", "smollm2", "--temp", "0", "-n", "4", "--json", "Summarise:",
                 input="The sky is blue because of Rayleigh scattering.")
    assert alone.returncode == 0 and joined.returncode == 0, alone.stderr + joined.stderr
    alone_data, joined_data = json.loads(alone.stdout), json.loads(joined.stdout)
    assert alone_data["model"].endswith(model_path.name)  # smollm2 is smollm2:135m
    assert joined_data["prompt_tokens"] > alone_data["prompt_tokens"] + 8  # the piped text was added


def test_verbose_before_or_after_the_command_prints_statistics(model_path):
    for args in (["-v", "run", str(model_path)], ["run", str(model_path), "-v"]):
        result = run(*args, "--temp", "0", "-n", "4", "hi")
        assert result.returncode == 0, result.stderr
        assert "tokens/s" in result.stderr and "llama_model_loader" not in result.stderr
    logged = run("--log-llama", "run", str(model_path), "--temp", "0", "-n", "2", "hi")
    assert logged.returncode == 0 and "llama" in logged.stderr


def test_show_never_downloads_and_list_shows_when(model_path):
    missing = run("show", "llama3.2:3b")
    assert missing.returncode == 1 and "MODEL_NOT_FOUND" in missing.stderr and "pull" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    shown = run("show", "smollm2")
    assert shown.returncode == 0 and "llama" in shown.stdout and "MB" in shown.stdout
    listed = run("list")
    assert listed.returncode == 0 and "MODIFIED" in listed.stdout and " ago" in listed.stdout


def test_serve_refuses_a_busy_port_before_loading_the_model():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", "-m", "/nowhere/model.gguf", "--port", str(port))  # the port is checked first
    assert result.returncode == 1 and "INVALID_CONFIG" in result.stderr and str(port) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_logs_one_line_per_request(model_path):
    from mullama_server import MullamaServer

    server = MullamaServer(model_path, parallel=1, ctx_size=512)
    try:
        status, body = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 3, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] <= 3
        server.post("/v1/nowhere", {})
        deadline = time.monotonic() + 10
        while len([line for line in server.log if "/v1/" in line]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = [line for line in server.log if "/v1/" in line]
        assert any(re.search(r"127\.0\.0\.1 POST /v1/completions 200 \d+ tokens \d+ ms", line) for line in lines), lines
        assert any("POST /v1/nowhere 404" in line for line in lines), lines
    finally:
        server.close()


# --- the chat -----------------------------------------------------------------------------------------
def test_a_long_chat_in_a_small_context_never_fails(model_path, tmp_path):
    child = spawn("chat", str(model_path), "--temp", "0", "-n", "40", "-c", "256")
    child.expect(">>> ")
    dropped = 0
    for turn in range(20):
        child.sendline(f"Tell me one fact about the number {turn}.")
        index = child.expect([r"dropped the \d+ oldest turn", r"prompt tokens cached", "error"])
        assert index != 2, child.before
        if index == 0:
            dropped += 1
            child.expect("prompt tokens cached")
        child.expect(">>> ")
    assert dropped > 0  # the context filled up, and the chat went on
    child.sendline("/show")
    child.expect("256 tokens")
    child.expect(">>> ")
    end_chat(child)


def test_chat_multiline_set_show_help_and_bad_paths(model_path, tmp_path):
    child = spawn("chat", str(model_path), "--temp", "0", "-n", "24", "--record", "/nonexistent/dir/chat.svg")
    child.expect(">>> ")
    child.sendline("/?")
    child.expect("/set PARAMETER VALUE")
    child.expect(">>> ")
    child.sendline('"""Here are two lines:')
    child.expect(r"\.\.\. ")
    child.sendline('roses and violets."""')
    child.expect("prompt tokens cached")
    child.expect(">>> ")
    child.sendline("/save /nonexistent/dir/x.json")
    child.expect("cannot save to /nonexistent/dir/x.json")
    child.expect(">>> ")
    child.sendline(f"/save {tmp_path / 'ok.json'}")
    child.expect("saved 2 messages")  # the multi-line message is one message
    child.expect(">>> ")
    assert "roses and violets." in json.loads((tmp_path / "ok.json").read_text())["messages"][0]["content"]
    child.send("\x1b[200~a pasted line\nand another\x1b[201~\r")  # bracketed paste: one message
    child.expect("prompt tokens cached")
    child.expect(">>> ")
    child.sendline(f"/save {tmp_path / 'ok.json'}")
    child.expect("saved 4 messages")
    child.expect(">>> ")
    assert json.loads((tmp_path / "ok.json").read_text())["messages"][2]["content"] == "a pasted line\nand another"
    child.sendline("/set temperature 0.3")
    child.expect("set temperature to 0.3")
    child.expect(">>> ")
    child.sendline("/set top_k lots")
    child.expect("cannot set top_k")
    child.expect(">>> ")
    child.sendline("/show")
    child.expect(r"temperature\s+0\.3")
    child.expect(">>> ")
    end_chat(child, "cannot save the recording")


def test_run_with_a_model_and_no_prompt_in_a_terminal_starts_a_chat(model_path):
    child = spawn("run", str(model_path), "--temp", "0", "-n", "8")
    child.expect("Ctrl-D to leave")
    child.expect(">>> ")
    child.sendline("Hi")
    child.expect("prompt tokens cached")
    child.expect(">>> ")
    end_chat(child)
