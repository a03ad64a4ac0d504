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


def spawn(*args: str, dimensions: tuple[int, int] = (40, 100), **kwargs) -> pexpect.spawn:
    """``mullama ARGS`` in a terminal of ``dimensions`` (rows, columns); COLUMNS and LINES stay 100 and 40,
    as a shell that exported them before its window was resized leaves them."""
    env = dict(os.environ, COLUMNS="100", LINES="40", TERM="xterm-256color")
    return pexpect.spawn(sys.executable, ["-m", "mullama", *args], env=env, encoding="utf-8", timeout=300,
                         dimensions=dimensions, **kwargs)


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
    assert unknown.returncode == 1 and "--no-such-option" in unknown.stderr


def test_one_line_errors_and_exit_codes():
    bad_arg = run("run", "--max-tokens", "many", "hi")  # a usage error: the same one line as any error
    assert bad_arg.returncode == 1 and len(bad_arg.stderr.strip().splitlines()) == 1
    assert bad_arg.stderr.startswith("mullama: error [INVALID_CONFIG]: ")
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


UNENDING = 1_000_000  # num_predict for a reply that Ctrl-C must stop: only a full context ends it sooner


def interrupt_a_long_reply(child, request: str, max_tokens: int) -> None:
    """Ask for a long reply, send Ctrl-C once it has started, and see the chat say so and go on.
    The reply cannot end before the Ctrl-C arrives: its limit is a full context (thousands of tokens;
    greedy, this model's long stories loop on until a limit ends them), not a short max_tokens that the
    reply may reach, on a busy machine, before the Ctrl-C is read. The chat's max_tokens is put back after."""
    child.sendline(f"/set num_predict {UNENDING}")
    child.expect(f"set num_predict to {UNENDING}")
    child.expect(">>> ")
    child.sendline(request)
    child.expect_exact(request.split()[-1] + "\r\n")  # our own line, echoed
    child.expect(r"\w+ \w+ \w+")  # the reply has started
    child.sendintr()
    child.expect("stopped")  # the end of an interrupted reply's status line
    child.expect(">>> ")
    child.sendline("/stats")  # the reply ended by Ctrl-C, not by its limit nor by the end of generation
    child.expect(r'"finish_reason"\S*: \S*"interrupted"')  # (colours around the JSON in a terminal)
    child.expect(">>> ")
    child.sendline(f"/set num_predict {max_tokens}")
    child.expect(f"set num_predict to {max_tokens}")
    child.expect(">>> ")


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
    interrupt_a_long_reply(child, "Write a very long story about the sea, with many chapters.", 120)
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
    if command == ["serve", "--help"]:
        assert "--embeddings" in result.stdout and "always served" in result.stdout


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
    assert alone_data["model"] == "smollm2:135m" and alone_data["path"] == str(model_path)  # smollm2 is smollm2:135m
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
        deadline = time.monotonic() + 120  # (a bound against a hang only: the lines come when they are logged)
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
    child = spawn("chat", str(model_path), "--temp", "0", "-n", "24")
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
    end_chat(child)


def test_run_with_a_model_and_no_prompt_in_a_terminal_starts_a_chat(model_path):
    child = spawn("run", str(model_path), "--temp", "0", "-n", "8")
    child.expect("Ctrl-D to leave")
    child.expect(">>> ")
    child.sendline("Hi")
    child.expect("prompt tokens cached")
    child.expect(">>> ")
    end_chat(child)


# --- what a first-time user runs into -------------------------------------------------------------------
def test_a_mistyped_model_name_is_an_error_and_ordinary_words_are_the_prompt(model_path):
    """`mullama run smollm "Say hi"` names no model: an error, not a reply of the default model to
    "smollm Say hi"; `--` or --prompt makes such a word the prompt; ordinary words are prompts."""
    typo = run("run", "smollm", "Say hi")
    assert typo.returncode == 1 and not typo.stdout, typo.stderr
    assert "unknown model 'smollm': did you mean smollm2:135m?" in typo.stderr and "run -- smollm" in typo.stderr
    assert len(typo.stderr.strip().splitlines()) == 1
    for other_typo, close in (("qwen3", "qwen2.5:0.5b"), ("smollm2:1.7b", "smollm2:135m")):
        refused = run("run", other_typo, "hi")
        assert refused.returncode == 1 and f"did you mean {close}?" in refused.stderr, refused.stderr
    greedy = ("-n", "6", "--temp", "0", "--json")
    dashed = run("run", *greedy, "--", "smollm", "is", "a", "word")
    prompted = run("run", *greedy, "--prompt", "smollm is a word")
    assert dashed.returncode == 0 and prompted.returncode == 0, dashed.stderr + prompted.stderr
    assert json.loads(dashed.stdout)["model"] == "smollm2:135m"  # the default model answered the words
    assert json.loads(dashed.stdout)["prompt_tokens"] == json.loads(prompted.stdout)["prompt_tokens"]
    word = run("run", "hello", *greedy)  # one ordinary word, far from every model name: the prompt
    same = run("run", *greedy, "-p", "hello")
    sentence = run("run", "Why is the sky blue?", *greedy)
    assert word.returncode == 0 and same.returncode == 0 and sentence.returncode == 0, word.stderr + sentence.stderr
    assert json.loads(word.stdout)["text"] == json.loads(same.stdout)["text"]
    assert json.loads(word.stdout)["prompt_tokens"] == json.loads(same.stdout)["prompt_tokens"]
    assert json.loads(sentence.stdout)["text"]


@pytest.fixture(scope="module")
def base_model_path():
    """gemma3:270m, a base model without a chat template (pulled once into the cache)."""
    from mullama.hub import _pull

    return _pull.resolve("gemma3:270m")


def test_a_base_model_completes_the_prompt_as_is(base_model_path, model_path):
    result = run("run", "gemma3:270m", "The capital of France is", "-n", "6", "--temp", "0", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"] == "gemma3:270m" and data["raw"] and data["text"] and data["path"] == str(base_model_path)
    assert data["prompt_tokens"] <= 8  # the words alone (and BOS), no template around them
    notice = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(notice) == 1 and "no chat template" in notice[0] and "as is" in notice[0], result.stderr
    chat = run("chat", "gemma3:270m", input="Hello\n")
    assert chat.returncode == 1 and "TEMPLATE_ERROR" in chat.stderr and "mullama run" in chat.stderr, chat.stderr
    # --raw does the same for a model that has a template; without it, the template wraps the words.
    raw = run("run", str(model_path), "--raw", "-n", "4", "--temp", "0", "--json", "The capital of France is")
    templated = run("run", str(model_path), "-n", "4", "--temp", "0", "--json", "The capital of France is")
    assert raw.returncode == 0 and templated.returncode == 0, raw.stderr + templated.stderr
    raw_data, templated_data = json.loads(raw.stdout), json.loads(templated.stdout)
    assert raw_data["raw"] and not templated_data["raw"] and "no chat template" not in raw.stderr
    assert raw_data["prompt_tokens"] + 10 < templated_data["prompt_tokens"]


def test_chat_on_a_base_model_in_python_names_the_keyword(base_model_path):
    import mullama

    with mullama.Model.load(base_model_path) as model, mullama.Context(model, n_ctx=256) as context:
        with pytest.raises(mullama.TemplateError, match=r"chat_template=\.\.\."):
            context.chat_stream([{"role": "user", "content": "Hi"}], max_tokens=2)


def test_a_reply_cut_by_max_tokens_says_so_off_standard_output(model_path):
    cut = run("run", str(model_path), "-n", "4", "--temp", "0", "Why is the sky blue?")
    assert cut.returncode == 0, cut.stderr
    assert "max tokens" not in cut.stdout and cut.stdout.strip()  # a pipe gets the reply alone
    assert "… (max tokens)" in cut.stderr
    finished = run("run", str(model_path), "--raw", "-n", "40", "--temp", "0", "--stop", "four",
                   "Count from one to ten: one, two, three,")
    assert finished.returncode == 0 and "max tokens" not in finished.stderr, finished.stderr
    as_json = run("run", str(model_path), "-n", "4", "--temp", "0", "--json", "Why is the sky blue?")
    assert json.loads(as_json.stdout)["finish_reason"] == "length"


def test_serve_takes_its_model_as_a_word_and_llama_servers_embeddings_flag(model_path):
    """`mullama serve MODEL` (docs/vision.md's form, as run and chat take it) and `-m MODEL` alike."""
    from mullama_server import MullamaServer

    server = MullamaServer(None, parallel=1, ctx_size=512, extra=(str(model_path), "--embeddings"))
    try:
        status, body = server.post("/v1/embeddings", {"input": "a cat"})
        assert status == 200 and len(body["data"][0]["embedding"]) == 576  # SmolLM2-135M's width
    finally:
        server.close()
    two = run("serve", "smollm2", "-m", str(model_path))
    assert two.returncode == 1 and "two models" in two.stderr


def test_bench_takes_the_model_and_context_flags_of_run(model_path):
    flagged = run("bench", "-m", str(model_path), "-c", "512", "-n", "8", "--json")
    assert flagged.returncode == 0, flagged.stderr
    data = json.loads(flagged.stdout)
    assert data["model"] == str(model_path) and data["context"] == 512 and data["decode_tokens_per_second"] > 0
    named = run("bench", "smollm2", "--ctx-size", "300", "-n", "8", "--json")
    assert named.returncode == 0, named.stderr
    assert json.loads(named.stdout)["model"] == "smollm2:135m" and json.loads(named.stdout)["path"] == str(model_path)
    small = run("bench", "-m", str(model_path), "-c", "100")
    assert small.returncode == 1 and "INVALID_CONFIG" in small.stderr and "--ctx-size" in small.stderr


def test_chat_refuses_a_recording_it_could_not_write_at_once(model_path, tmp_path):
    bad = run("chat", str(model_path), "--record", "/nonexistent/dir/chat.svg", input="Hello\n")
    assert bad.returncode == 1, bad.stderr
    assert "INVALID_CONFIG" in bad.stderr and "--record /nonexistent/dir/chat.svg" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not bad.stdout  # before the model, before any reply
    good = tmp_path / "chat.svg"
    checked = run("chat", str(model_path), "--record", str(good), "-n", "4", input="/exit\n")
    assert checked.returncode == 0 and good.read_text().startswith("<svg"), checked.stderr


def _screen_rows(output: str, rows: int, columns: int) -> list[str]:
    """What a terminal of this size shows after ``output``: the scrolled-off rows, then the screen."""
    import pyte

    screen = pyte.HistoryScreen(columns, rows, history=10_000)
    pyte.Stream(screen).feed(output)
    scrolled = ["".join(line[x].data for x in range(columns)) for line in screen.history.top]
    return [row.rstrip() for row in scrolled + screen.display]


def _rendered(markdown: str, columns: int) -> list[str]:
    """The rows of ``markdown`` printed once by Rich at this width."""
    import io

    from rich.console import Console
    from rich.markdown import Markdown

    console = Console(width=columns, file=io.StringIO(), record=True)
    console.print(Markdown(markdown))
    return [row.rstrip() for row in console.export_text().splitlines()]


def test_chat_shows_each_reply_once_in_a_narrow_terminal(model_path, tmp_path):
    """At 40 columns (with COLUMNS still saying 100) every line of a reply is wider than the terminal;
    the screen must show each reply once, as printed at the end, also one stopped with Ctrl-C."""
    child = spawn("chat", str(model_path), "--temp", "0", "-n", "60", dimensions=(24, 40))
    output: list[str] = []
    child.logfile_read = type("Log", (), {"write": lambda _, text: output.append(text), "flush": lambda _: None})()
    child.expect(">>> ")
    child.sendline("Tell me about Paris.")
    child.expect("prompt tokens cached")
    child.expect(">>> ")
    interrupt_a_long_reply(child, "Write a long story about the sea.", 60)
    saved = tmp_path / "conversation.json"
    child.sendline(f"/save {saved}")
    child.expect("saved 4 messages")
    child.expect(">>> ")
    end_chat(child)
    replies = [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "assistant"]
    assert all(reply.strip() for reply in replies)
    rows = _screen_rows("".join(output), 24, 40)
    for prompt, reply in zip(("Tell me about Paris.", "Write a long story about the sea."), replies):
        start = rows.index(f">>> {prompt}") + 1
        end = next(i for i in range(start, len(rows)) if re.match(r"\d+ tokens · ", rows[i]))
        shown = rows[start:end]
        while shown and not shown[-1]:  # (a blank row after a stopped reply)
            shown.pop()
        assert shown == _rendered(reply, 40), "\n".join(rows)
