"""``mullama chat``: a terminal chat that streams replies as Markdown, with Rich.

Multi-turn with the model's own chat template; the Context keeps its KV cache, so a
follow-up turn only decodes what is new. Ctrl-C stops the reply being written (the
model and the conversation stay); Ctrl-D or /exit leaves. When output is not a
terminal, replies are written as plain text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from ._config import StreamConfig
from ._context import Context
from ._exceptions import MullamaError
from ._model import Model

HELP = """\
/help           this help
/system TEXT    set the system message (and start over)
/reset          forget the conversation (the system message stays)
/save FILE      save the conversation as JSON
/load FILE      load a conversation saved with /save
/stats          statistics of the last reply and the session
/exit           leave (Ctrl-D works too)
Ctrl-C stops the reply being written."""


class TerminalChat:
    def __init__(self, model: Model, context: Context, config: StreamConfig, *, system: str | None = None,
                 console: Console | None = None, model_name: str = "") -> None:
        self.model, self.context, self.config = model, context, config
        self.console = console or Console(highlight=False)
        self.system = system
        self.messages: list[dict[str, Any]] = []
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

    def _read(self) -> str:
        if sys.stdin.isatty():
            return input("\001\033[1;32m\002>>> \001\033[0m\002")
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def _setup_history(self) -> None:
        if not sys.stdin.isatty():
            return
        try:
            import readline

            from ._paths import cache_root

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

    def reply(self, text: str) -> str:
        self.messages.append({"role": "user", "content": text})
        self.transcript.append(Text.assemble((">>> ", "bold green"), text))
        stream = self.context.chat_stream(self.conversation(), config=self.config)
        parts: list[str] = []
        interrupted = False
        try:
            if self.console.is_terminal:
                with Live(Text(""), console=self.console, refresh_per_second=15, vertical_overflow="visible") as live:
                    for token in stream:
                        if token.text:
                            parts.append(token.text)
                            live.update(Markdown("".join(parts)), refresh=False)
                    live.update(Markdown("".join(parts)))
            else:
                for token in stream:
                    if token.text:
                        parts.append(token.text)
                        self.console.file.write(token.text)
                        self.console.file.flush()
                self.console.file.write("\n")
        except KeyboardInterrupt:
            interrupted = True
        except MullamaError as error:
            self.console.print(f"[red]error [{error.code}][/]: {error}")
        finally:
            stream.close()
        answer = "".join(parts)
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
        if name == "/help":
            console.print(HELP, highlight=False)
        elif name == "/system":
            self.system = argument or None
            self.messages = []
            console.print(f"[dim]system message {'set' if argument else 'cleared'}; conversation reset[/]")
        elif name == "/reset":
            self.messages = []
            console.print("[dim]conversation reset[/]")
        elif name == "/save":
            if not argument:
                console.print("[red]usage: /save FILE[/]")
            else:
                data = {"model": self.model_name, "system": self.system, "messages": self.messages}
                Path(argument).expanduser().write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
                console.print(f"[dim]saved {len(self.messages)} messages to {argument}[/]")
        elif name == "/load":
            self._load(argument)
        elif name == "/stats":
            console.print_json(json.dumps({"last_reply": self.last, "session": self.totals,
                                           "messages": len(self.messages), "system": self.system,
                                           "cached_tokens": len(self.context.cached_tokens)}))
        else:
            console.print(f"[red]unknown command {name}[/]; /help lists them")
        return None

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
              record: str | None = None) -> int:
    with Model.load(model_ref) as model, Context(model, n_ctx=ctx_size) as context:
        chat = TerminalChat(model, context, config, system=system, model_name=model_ref)
        try:
            return chat.run()
        finally:
            if record:
                chat.save_svg(record)
