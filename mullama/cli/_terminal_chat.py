"""``mullama chat``: a terminal chat that streams replies as Markdown, with Rich.

Multi-turn with the model's own chat template; the Context keeps its KV cache, so a
follow-up turn only decodes what is new. When the next turn would not fit in the context,
the oldest turns are dropped (the system message stays), with a notice, as ollama does; a
turn that fails leaves nothing in the history. Ctrl-C stops the reply being written (the
model and the conversation stay); Ctrl-D or /exit leaves. Three double quotes start and end
a multi-line message. When output is not a terminal, replies are written as plain text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.markup import escape
from rich.segment import Segment
from rich.spinner import Spinner
from rich.text import Text

from .._exceptions import MullamaError, TemplateError
from ..chat._media_parts import split_media
from ..generate._config import StreamConfig
from ..generate._context import Context
from ..generate._model import Model, tokenize_prompt
from ._args import check_generates

HELP = """\
/help, /?              this help
/system TEXT           set the system message (and start over)
/reset                 forget the conversation (the system message stays)
/save FILE             save the conversation as JSON
/load FILE             load a conversation saved with /save
/image FILE            attach an image to your next message (a model loaded with --mmproj)
/set PARAMETER VALUE   temperature, top_k, top_p, min_p, seed, num_predict or num_ctx
/show                  the model and the parameters in use
/stats                 statistics of the last reply and the session
/exit                  leave (Ctrl-D works too)
\"\"\" starts a message of several lines; another \"\"\" ends it.
Ctrl-C stops the reply being written."""

MULTILINE = '"' * 3  # starts and ends a message of several lines

# /set PARAMETER: the StreamConfig field it changes, and the value's type (ollama's names).
SETTABLE = {"temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
            "min_p": ("min_p", float), "seed": ("seed", int), "num_predict": ("max_tokens", int),
            "repeat_penalty": ("repeat_penalty", float)}


class _Tail:
    """The last screenful of a renderable: what a live view can show, and erase, while a reply grows
    beyond the screen (the whole reply is printed once, at its end). One column is left free: a
    character the terminal draws wider than Rich counts (some emoji) must not wrap a line, since a
    row the live view does not know of is a row it does not erase (and the reply would show twice)."""

    def __init__(self, renderable: Any) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options.update_width(max(1, options.max_width - 1)),
                                     pad=False)
        for line in lines[-max(1, console.size.height - 2):]:
            yield from line
            yield Segment.line()


@contextlib.contextmanager
def _no_echo() -> Iterator[None]:
    """While a live view is on the screen, the terminal does not echo keys: an echoed ``^C`` or a key
    typed ahead would move the cursor behind the view's back, so that erasing the view left its first
    lines, and the reply, once printed whole, showed twice. Typed-ahead keys still reach the next prompt."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError):  # not a terminal
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # the local modes
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def terminal_console() -> Console:
    """The chat's Console. In a terminal its size is the terminal's own, read again at every render (as
    Rich does without COLUMNS and LINES): a COLUMNS exported by a shell before a resize, or by a parent
    program, would make every line of the live view wrap, and erasing it would leave rows behind."""
    environ = dict(os.environ)
    if sys.stdout.isatty():
        environ.pop("COLUMNS", None)
        environ.pop("LINES", None)
    return Console(highlight=False, _environ=environ)


class TerminalChat:
    def __init__(self, model: Model, context: Context, config: StreamConfig, *, system: str | None = None,
                 console: Console | None = None, model_name: str = "") -> None:
        self.model, self.context, self.config = model, context, config
        self.console = console or terminal_console()
        self.system = system
        self.messages: list[dict[str, Any]] = []
        self.images: list[str] = []  # attached with /image, sent with the next message
        self.model_name = model_name
        self.last: dict[str, Any] = {}
        self.totals = {"replies": 0, "tokens": 0}
        self._history_file: Path | None = None
        self.transcript: list[Any] = []  # what the screen showed, for --record

    # --- the loop -------------------------------------------------------------------
    def run(self) -> int:
        self._setup_history()
        console = self.console
        console.print(f"[bold]mullama chat[/] — {self.model_name or self.model.path.name}. "
                      "Type /help for commands, Ctrl-D to leave.", highlight=False)
        while True:
            try:
                line = self._read()
            except EOFError:
                console.print()
                break
            except KeyboardInterrupt:  # at the prompt: a fresh line, like a shell
                console.print()
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                if self.command(line.strip()) == "exit":
                    break
                continue
            self.reply(line)
        self._save_history()
        return 0

    def _read_line(self, prompt: str) -> str:
        if sys.stdin.isatty():
            return input(f"\001\033[1;32m\002{prompt}\001\033[0m\002")
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def _read(self) -> str:
        """One message: a line, or the lines between two \"\"\" (as in ollama)."""
        line = self._read_line(">>> ")
        if not line.lstrip().startswith(MULTILINE):
            return line
        text = line.lstrip()[3:]
        lines = []
        while not text.rstrip().endswith(MULTILINE):
            lines.append(text)
            text = self._read_line("... ")
        lines.append(text.rstrip()[:-3])
        return "\n".join(lines).strip("\n") or " "

    def _setup_history(self) -> None:
        if not sys.stdin.isatty():
            return
        try:
            import readline

            from .._paths import cache_root

            self._history_file = cache_root() / "chat_history"
            if self._history_file.exists():
                readline.read_history_file(self._history_file)
            readline.set_history_length(1000)
        except (ImportError, OSError):
            self._history_file = None

    def _save_history(self) -> None:
        if self._history_file is None:
            return
        try:
            import readline

            self._history_file.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(self._history_file)
        except (ImportError, OSError):
            pass

    # --- one turn -------------------------------------------------------------------
    def conversation(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def _fit(self) -> bool:
        """Drop the oldest turns until the conversation and room for a reply fit in the context.
        False when even the last message alone does not fit."""
        room = min(self.config.max_tokens or 256, self.context.n_ctx // 4)
        dropped = 0
        while True:
            text_only, _media = split_media(self.conversation(), "")  # an image's positions are not counted here
            prompt = self.model.apply_chat_template(text_only, add_generation_prompt=True)
            if len(tokenize_prompt(self.model, prompt)) + room <= self.context.n_ctx:
                break
            if len(self.messages) <= 1:
                return False
            del self.messages[:2 if len(self.messages) > 2 else 1]  # a user turn and its reply
            dropped += 1
        if dropped:
            self._notice(f"the context is full: dropped the {dropped} oldest turn{'s' * (dropped > 1)} "
                         "(/reset starts over, --ctx-size gives more room)")
        return True

    def _notice(self, text: str, style: str = "dim") -> None:
        self.console.print(f"[{style}]{escape(text)}[/]")

    def reply(self, text: str) -> str:
        images = [{"type": "image_url", "image_url": {"url": path}} for path in self.images]
        self.images = []
        self.messages.append({"role": "user", "content": [{"type": "text", "text": text}, *images] if images else text})
        self.transcript.append(Text.assemble((">>> ", "bold green"), text))
        try:
            fits = self._fit()
        except MullamaError as error:
            fits = False
            self._notice(f"error [{error.code}]: {error}", "red")
        if not fits:
            self.messages.pop()
            self._notice(f"this message does not fit in the context ({self.context.n_ctx} tokens with room for a "
                         "reply): send a shorter one, or restart with a larger --ctx-size", "red")
            return ""
        stream = self.context.chat_stream(self.conversation(), config=self.config)
        parts: list[str] = []
        interrupted = failed = False
        try:
            if self.console.is_terminal:
                with _no_echo(), Live(Spinner("dots", style="dim"), console=self.console, refresh_per_second=15,
                                      transient=True) as live:
                    for token in stream:
                        if token.text:
                            parts.append(token.text)
                            live.update(_Tail(Markdown("".join(parts))), refresh=False)
                self.console.print(Markdown("".join(parts)))  # once: the live view is gone
            else:
                for token in stream:
                    if token.text:
                        parts.append(token.text)
                        self.console.file.write(token.text)
                        self.console.file.flush()
                self.console.file.write("\n")
        except KeyboardInterrupt:
            interrupted = True
            if self.console.is_terminal:
                self.console.print(Markdown("".join(parts)))
        except MullamaError as error:
            failed = True
            self._notice(f"error [{error.code}]: {error}", "red")
        finally:
            stream.close()
        answer = "".join(parts)
        if failed:  # nothing of a failed turn stays
            self.messages.pop()
            return ""
        self.messages.append({"role": "assistant", "content": answer})
        self.transcript.append(Markdown(answer))
        self._status(stream, interrupted)
        return answer

    def _status(self, stream, interrupted: bool) -> None:
        ttft = stream.time_to_first_token()
        tps = stream.tokens_per_second()
        self.last = {"tokens": stream.tokens_generated(), "tokens_per_second": round(tps, 1),
                     "time_to_first_token_ms": round(ttft * 1000, 1) if ttft is not None else None,
                     "prompt_tokens": stream.prompt_tokens, "cached_prompt_tokens": stream.cached_tokens,
                     "finish_reason": "interrupted" if interrupted else stream.finish_reason}
        self.totals["replies"] += 1
        self.totals["tokens"] += stream.tokens_generated()
        note = " · [yellow]stopped[/]" if interrupted else ""
        first = f"{ttft * 1000:.0f} ms to first token · " if ttft is not None else ""
        status = (f"[dim]{stream.tokens_generated()} tokens · {tps:.1f} tokens/s · {first}"
                  f"{stream.cached_tokens}/{stream.prompt_tokens} prompt tokens cached[/]{note}")
        self.console.print(status)
        self.transcript.append(Text.from_markup(status))

    def save_svg(self, path: str) -> None:
        """The session as a picture: each prompt, the rendered reply, and its status line."""
        import io

        picture = Console(record=True, file=io.StringIO(), width=min(self.console.width, 100),
                          force_terminal=True, color_system="truecolor")
        picture.print(Text.assemble(("mullama chat", "bold"), (" · " + self.model_name, "dim")))
        for item in self.transcript:
            picture.print(item)
        picture.save_svg(path, title=f"mullama chat {self.model_name}")

    # --- slash commands -------------------------------------------------------------
    def command(self, line: str) -> str | None:
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        console = self.console
        if name in ("/exit", "/quit", "/bye"):
            return "exit"
        if name in ("/help", "/?"):
            console.print(HELP, highlight=False, markup=False)
        elif name == "/system":
            self.system = argument or None
            self.messages = []
            console.print(f"[dim]system message {'set' if argument else 'cleared'}; conversation reset[/]")
        elif name == "/reset":
            self.messages = []
            console.print("[dim]conversation reset[/]")
        elif name == "/save":
            self._save(argument)
        elif name == "/set":
            self._set(argument)
        elif name == "/show":
            self._show()
        elif name == "/load":
            self._load(argument)
        elif name == "/image":
            self._attach(argument)
        elif name == "/stats":
            console.print_json(json.dumps({"last_reply": self.last, "session": self.totals,
                                           "messages": len(self.messages), "system": self.system,
                                           "cached_tokens": len(self.context.cached_tokens)}))
        else:
            console.print(f"[red]unknown command {name}[/]; /help lists them")
        return None

    def _attach(self, argument: str) -> None:
        path = Path(argument).expanduser()
        if not self.model.supports_vision:
            self._notice("this model takes no images: start the chat with --mmproj FILE (its projector)", "red")
        elif not argument or not path.is_file():
            self._notice(f"usage: /image FILE (an image file; {escape(argument) or 'none given'} is not one)", "red")
        else:
            self.images.append(str(path.resolve()))
            self._notice(f"{path.name} will go with your next message")

    def _save(self, argument: str) -> None:
        if not argument:
            self._notice("usage: /save FILE", "red")
            return
        data = {"model": self.model_name, "system": self.system, "messages": self.messages}
        try:
            Path(argument).expanduser().write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except OSError as exc:
            self._notice(f"cannot save to {argument}: {exc.strerror or exc}; the conversation is kept", "red")
            return
        self._notice(f"saved {len(self.messages)} messages to {argument}")

    def _set(self, argument: str) -> None:
        parameter, _, value = argument.partition(" ")
        if parameter == "num_ctx":
            self._resize(value.strip())
            return
        if parameter not in SETTABLE or not value.strip():
            self._notice(f"usage: /set PARAMETER VALUE, with PARAMETER one of {', '.join([*SETTABLE, 'num_ctx'])}",
                         "red")
            return
        field, kind = SETTABLE[parameter]
        try:
            self.config = dataclasses.replace(self.config, **{field: kind(value.strip())})
        except (ValueError, MullamaError) as exc:
            self._notice(f"cannot set {parameter} to {value.strip()}: {exc}", "red")
            return
        self._notice(f"set {parameter} to {value.strip()}")

    def _resize(self, value: str) -> None:
        """A new context of ``value`` tokens (the conversation is kept; its cache is rebuilt)."""
        try:
            n_ctx = int(value)
            context = Context(self.model, n_ctx=n_ctx, n_threads=self.context.n_threads,
                              flash_attn=self.context.flash_attn)
        except (ValueError, MullamaError) as exc:
            self._notice(f"cannot set num_ctx to {value}: {exc}", "red")
            return
        self.context.close()
        self.context = context
        self._notice(f"set num_ctx to {context.n_ctx}")

    def _show(self) -> None:
        config = self.config
        rows = {"model": self.model_name or self.model.path.name, "description": self.model.description,
                "context": f"{self.context.n_ctx} tokens", "threads": self.context.n_threads,
                "system": self.system or "-", "temperature": config.temperature, "top_k": config.top_k,
                "top_p": config.top_p, "min_p": config.min_p, "repeat_penalty": config.repeat_penalty,
                "seed": config.seed if config.seed is not None else "random", "num_predict": config.max_tokens}
        for key, value in rows.items():
            self.console.print(f"  {key:>14}  {escape(str(value))}", highlight=False)

    def _load(self, argument: str) -> None:
        try:
            data = json.loads(Path(argument).expanduser().read_text())
            messages = data["messages"]
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise ValueError("messages must be a list of {role, content}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.console.print(f"[red]cannot load {argument}: {exc}[/]")
            return
        self.system = data.get("system") if isinstance(data.get("system"), str) else None
        self.messages = messages
        self.console.print(f"[dim]loaded {len(messages)} messages[/]")


def chat_main(model_ref: str, *, system: str | None, config: StreamConfig, ctx_size: int | None,
              threads: int | None = None, record: str | None = None, chat_template: str | None = None,
              placement: dict[str, Any] | None = None, mmproj: str | Literal[False] | None = None,
              flash_attn: bool | None = None) -> int:
    """The terminal chat on ``model_ref`` (``placement``: Model.load's offloading options)."""
    console = terminal_console()
    with console.status(f"loading {model_ref} ...", spinner="dots") if console.is_terminal else nullcontext():
        model = Model.load(model_ref, chat_template=chat_template, mmproj=mmproj, **(placement or {}))
        try:
            check_generates(model, model_ref)
            if model.chat_template is None:
                raise TemplateError(f"{model_ref} has no chat template (a base model), so it cannot chat: "
                                    f"`mullama run {model_ref} PROMPT` completes text, or give a template with "
                                    "--chat-template-file.")
            context = Context(model, n_ctx=ctx_size, n_threads=threads, flash_attn=flash_attn)
        except BaseException:
            model.close()
            raise
    with model:
        chat = TerminalChat(model, context, config, system=system, model_name=model_ref, console=console)
        try:
            return chat.run()
        finally:
            chat.context.close()
            if record:
                try:
                    chat.save_svg(record)
                except OSError as exc:
                    console.print(f"[red]cannot save the recording to {escape(record)}: {exc.strerror or exc}[/]")
