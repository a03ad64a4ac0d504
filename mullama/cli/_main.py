"""The ``mullama`` command: ``run``, ``chat``, ``embed``, ``serve``, ``pull``, ``list``, ``show``, ``info``, ..."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__
from .._exceptions import InvalidConfigError, ModelNotFoundError, MullamaError

EXAMPLES = """examples:
  mullama run "Why is the sky blue?"            stream a reply from the default model
  mullama chat                                  chat in the terminal
  mullama serve --parallel 4                    OpenAI-compatible server on 127.0.0.1:8080
  mullama serve --models smollm2,gemma3:270m    several models, each loaded when a request names it
  mullama ps                                    the models a running server has loaded
  mullama run smollm2:135m "Hello" --json       the reply and its statistics as JSON
  echo "Summarise: ..." | mullama run           the prompt from standard input
  mullama run --raw "The capital of France is"  plain completion, no chat template
  mullama run gemma3:270m "Once upon a time"    a base model (no chat template) completes the text as is
  mullama run -- smollm is a small model        words after -- are the prompt, never a model name
  mullama run smollm2 -f notes.txt --temp 0     the prompt from a file, greedy
  cat notes.txt | mullama run "Summarise:"      the prompt, a blank line, then standard input
  mullama embed all-minilm:l6-v2 "a cat" "a dog"  one JSON line of embedding per text
  mullama pull qwen2.5:0.5b                     download a model (resumable, verified)
  mullama list                                  models in the cache
  mullama show smollm2:135m                     architecture, parameters, quantisation, context
  mullama info                                  library, llama.cpp commit, cache
"""


_HF_NAME = re.compile(r"^hf:[\w.\-]+/[\w.@\-]+(:[\w./\-]+)?$")
_TAGGED_NAME = re.compile(r"^[A-Za-z][\w.\-]*:[\w.\-]+$")  # name:tag, as ollama's


def _is_model(word: str, command: str) -> bool:
    """Whether the first word names the model: ``model.gguf``, ``hf:owner/repo``, a known name or family
    (``smollm2:135m``, ``smollm2``). A word that only looks like a model name (``name:tag``, or within a
    typo of a known name: ``smollm``, ``qwen3``) is MODEL_NOT_FOUND, naming the close ones, rather than
    the first word of a prompt; an ordinary word (``hello``, ``Why``) is the prompt."""
    from ..hub._hub import close_names, entry_for

    if word.endswith(".gguf") or _HF_NAME.match(word):
        return True
    if not (_TAGGED_NAME.match(word) or close_names(word)):
        return False
    try:
        entry_for(word)
    except ModelNotFoundError as error:
        raise ModelNotFoundError(f"{error} If {word!r} is the start of the prompt, write `mullama {command} -- "
                                 f"{word} ...`.") from None
    return True


def _model_and_words(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The model (``-m``, else a first word that names one, else the default) and the other words.
    Words after ``--`` are never the model."""
    from ..hub._hub import DEFAULT_MODEL

    words = list(args.words)
    model_name = args.model
    if model_name is None and words and args.words_before_dashes and _is_model(words[0], args.command):
        model_name = words.pop(0)
    return model_name or DEFAULT_MODEL, words


def _model_label(model_ref: str) -> str:
    """A model's name for messages and ``--json``: a known name in full (``smollm2`` is ``smollm2:135m``),
    a path or a Hugging Face name as given."""
    from ..hub._hub import entry_for, is_local_path

    if is_local_path(model_ref) or model_ref.startswith("hf:"):
        return model_ref
    return entry_for(model_ref).name


def _note(text: str) -> None:
    """One dim line on standard error (plain when that is not a terminal): standard output holds only the
    reply, for pipes."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[dim]{escape(text)}[/]")


def _config(args: argparse.Namespace, *, stop: list[str] | None = None) -> Any:
    """The StreamConfig the sampling flags ask for (unset flags keep StreamConfig's defaults)."""
    from ..generate._config import StreamConfig

    chosen = {name: getattr(args, name) for name in ("temperature", "seed", "top_k", "top_p", "min_p",
                                                      "repeat_penalty") if getattr(args, name, None) is not None}
    return StreamConfig(max_tokens=args.max_tokens, stop_sequences=stop or [], timeout_ms=None, **chosen)


def _check_ctx_size(value: int | None) -> None:
    """-c/--ctx-size: the rule and message of Context(n_ctx=...), checked before any model is loaded."""
    from ..generate._context_params import check_n_ctx

    check_n_ctx(value, "--ctx-size")


def _warn_ctx_size(value: int | None, model: Any) -> None:
    if value is not None and value > model.n_ctx_train:
        print(f"mullama: warning: --ctx-size {value} is beyond the {model.n_ctx_train} tokens this model was trained "
              "with; replies may degrade past that point.", file=sys.stderr)


def _prompt(words: list[str], file: str | None) -> str:
    """The prompt: the words (or -f FILE), then standard input when it is piped (joined by a blank line)."""
    parts = [" ".join(words)] if words else []
    if file is not None:
        try:
            parts.append(Path(file).expanduser().read_text(encoding="utf-8"))
        except OSError as exc:
            raise InvalidConfigError(f"cannot read the prompt file {file}: {exc.strerror}; check -f/--file.") from None
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        if piped.strip():
            parts.append(piped)
    return "\n\n".join(part for part in parts if part)


def _run(args: argparse.Namespace) -> int:
    from ..generate._context import Context
    from ..generate._model import Model

    model_name, words = _model_and_words(args)
    if args.prompt is not None:
        words.insert(0, args.prompt)
    _check_ctx_size(args.ctx_size)
    if not words and args.file is None and sys.stdin.isatty():
        return _chat(args, model_name)  # `mullama run MODEL` in a terminal: a chat, as with ollama
    prompt = _prompt(words, args.file)
    if not prompt.strip():
        raise InvalidConfigError("no prompt: give one as arguments, with -f FILE, or on standard input.")
    config = _config(args, stop=args.stop)
    label = _model_label(model_name)
    with Model.load(model_name, chat_template=args.chat_template_file, **_placement(args)) as model, \
            Context(model, n_ctx=args.ctx_size, n_threads=args.threads) as context:
        _warn_ctx_size(args.ctx_size, model)
        raw = args.raw or model.chat_template is None
        if raw and not args.raw:  # a base model: complete the text, as ollama does
            _note(f"{label} has no chat template (a base model): completing the prompt as is, as --raw does"
                  + (", without the system message" if args.system else ""))
        if raw:
            stream = context.generate_stream(prompt, config=config)
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": prompt})
            stream = context.chat_stream(messages, config=config)
        with stream:
            for token in stream:
                if not args.json:
                    sys.stdout.write(token.text)
                    sys.stdout.flush()
        if args.json:
            json.dump({"model": label, "path": str(model.path), "raw": raw, "text": stream.text,
                       "finish_reason": stream.finish_reason,
                       "prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.tokens_generated(),
                       "time_to_first_token_s": stream.time_to_first_token(),
                       "tokens_per_second": stream.tokens_per_second()}, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stream.finish_reason == "length" and not args.json:  # cut short: say so, off standard output
            _note("… (max tokens)")
        if args.verbose:
            ttft = stream.time_to_first_token()
            print(f"[{stream.tokens_generated()} tokens, {stream.tokens_per_second():.1f} tokens/s, "
                  f"first token after {(ttft or 0) * 1000:.0f} ms, {stream.prompt_tokens} prompt tokens]",
                  file=sys.stderr)
    return 0


def _embed(args: argparse.Namespace) -> int:
    from ..generate._model import Model

    model_name, texts = _model_and_words(args)
    if not texts and not sys.stdin.isatty():
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        raise InvalidConfigError("no text: give texts as arguments, or one per line on standard input.")
    with Model.load(model_name) as model:
        vectors = model.embed(texts, pooling=args.pooling, normalize=not args.no_normalize,
                              batch_size=args.batch_size, truncate=args.truncate)
    for text, vector in zip(texts, vectors):
        sys.stdout.write(json.dumps({"text": text, "embedding": vector}, ensure_ascii=False) + "\n")
    return 0


def _chat(args: argparse.Namespace, model_name: str | None = None) -> int:
    from ..hub._hub import DEFAULT_MODEL
    from ._terminal_chat import chat_main

    _check_ctx_size(args.ctx_size)
    record = getattr(args, "record", None)
    if record is not None:
        _check_writable(record, "--record")
    return chat_main(model_name or _model_arg(args) or DEFAULT_MODEL, system=args.system, config=_config(args),
                     ctx_size=args.ctx_size, threads=args.threads, record=record,
                     chat_template=args.chat_template_file, placement=_placement(args))


def _check_writable(path: str, flag: str) -> None:
    """Refuse at once a file that could not be written later (a missing directory, no permission)."""
    target = Path(path).expanduser()
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as exc:
        raise InvalidConfigError(f"cannot write {flag} {path}: {exc.strerror or exc}; give a file in a "
                                 "directory that exists and is writable.") from None
    if not existed:
        target.unlink(missing_ok=True)


def _pull(args: argparse.Namespace) -> int:
    from ..hub._hub import pull

    path = pull(args.name, force=args.force)
    print(path)
    return 0


def _list(args: argparse.Namespace) -> int:
    from ..hub._hub import list_models

    models = list_models()
    if args.json:
        print(json.dumps([{"name": m.name, "size": m.size, "path": str(m.path), "sha256": m.sha256,
                           "source": m.source, "pulled_at": m.pulled_at} for m in models], indent=2))
        return 0
    if not models:
        print("no models in the cache yet: `mullama pull smollm2:135m`")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("NAME", "ID", "SIZE", "MODIFIED", box=None, header_style="bold")
    for m in models:
        table.add_row(m.name, m.sha256[:12], _size(m.size), _ago(m.pulled_at))
    Console().print(table)
    print("(`mullama show NAME` prints a model's path and metadata; `mullama list --json` lists paths)")
    return 0


def _size(n_bytes: float) -> str:
    """``n_bytes`` in human units (decimal, as ollama prints them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit in ("B", "KB") or n_bytes >= 100 else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} TB"


def _seconds_since(stamp: str) -> float | None:
    """Seconds from an ISO time (UTC when it names no zone) to now; None if it is not one."""
    import datetime

    try:
        then = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=datetime.timezone.utc)
    return (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()


def _ago(stamp: str) -> str:
    """An ISO time as ``3 minutes ago``."""
    seconds = _seconds_since(stamp)
    if seconds is None:
        return "-"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' * (count > 1)} ago"
    return "just now"


def _rm(args: argparse.Namespace) -> int:
    from ..hub._hub import remove

    for name in args.names:
        print(f"removed {name} ({remove(name)})")
    return 0


def _show(args: argparse.Namespace) -> int:
    from ..gguf._reader import read_gguf_info
    from ..hub._hub import cached, is_local_path

    name = args.name
    path = Path(name).expanduser() if is_local_path(name) else cached(name)
    if path is None:  # show never downloads
        raise ModelNotFoundError(f"{args.name} is not in the cache; `mullama pull {args.name}` downloads it "
                                 "(`mullama list` shows what is there).")
    info = read_gguf_info(path)
    summary = {"path": str(info.path), **info.summary()}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        summary["parameters"] = f"{info.n_params / 1e6:.1f}M"
        summary["size_bytes"] = _size(info.size_bytes)
        for key, value in summary.items():
            print(f"{key.replace('_', ' '):>15}: {value}")
    if args.template and info.chat_template:
        print(info.chat_template)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from ..server import SUPERVISED_ENV, parse_keep_alive, serve, supervise
    except ImportError as exc:
        raise InvalidConfigError(f"`mullama serve` needs the server extra ({exc.name} is missing): "
                                 "pip install 'mullama[server]'.") from None
    from ..hub._hub import DEFAULT_MODEL

    _check_ctx_size(args.ctx_size)
    if args.rpc and os.environ.get(SUPERVISED_ENV) != "1":  # ggml ends a process whose RPC server is lost
        return supervise(args.argv, host=args.host, port=args.port, drain_timeout=args.drain_timeout,
                         api_key=args.api_key or os.environ.get("MULLAMA_API_KEY"))
    if args.rpc:  # the supervised serving process: when ggml ends it, one line says why
        from ..native._devices import one_line_aborts
        from ..native._library import get

        one_line_aborts(get())
    models = [name.strip() for name in (args.models or "").split(",") if name.strip()]
    several = bool(models or args.models_dir)
    keep_alive = parse_keep_alive(args.keep_alive)
    return serve(args.model or (None if several else DEFAULT_MODEL), models=models, models_dir=args.models_dir,
                 host=args.host, port=args.port, parallel=args.parallel,
                 ctx_size=args.ctx_size, api_key=args.api_key or os.environ.get("MULLAMA_API_KEY"),
                 max_tokens_limit=args.max_tokens_limit, threads=args.threads, max_queue=args.max_queue,
                 pooling=args.pooling, embedding_batch=args.embedding_batch, chat_template=args.chat_template_file,
                 keep_alive=keep_alive, max_loaded=args.max_loaded, placement=_placement(args),
                 drain_timeout=args.drain_timeout,
                 max_memory=_parse_size(args.max_memory) if args.max_memory else None)


def _parse_size(text: str) -> int:
    """``2GB``, ``1.5G``, ``500MB``, ``750M`` or bytes, as a number of bytes (decimal units, as ``list``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise InvalidConfigError(f"--max-memory must be a size such as 2GB or 500MB, not {text!r}.")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def _ps(args: argparse.Namespace) -> int:
    """The models a running ``mullama serve`` has loaded (its GET /api/ps)."""
    import urllib.error
    import urllib.request

    url = f"http://{args.host}:{args.port}/api/ps"
    request = urllib.request.Request(url)
    key = args.api_key or os.environ.get("MULLAMA_API_KEY")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            models = json.load(response)["models"]
    except urllib.error.HTTPError as exc:
        why = ": wrong or missing API key (--api-key or MULLAMA_API_KEY)" if exc.code == 401 else ""
        raise InvalidConfigError(f"{url} answered {exc.code}{why}.") from None
    except (urllib.error.URLError, OSError) as exc:
        raise InvalidConfigError(f"no mullama server answers at {url} ({getattr(exc, 'reason', exc)}); start one "
                                 "with `mullama serve`, or pass --host/--port.") from None
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("NAME", "SIZE", "PROCESSOR", "CONTEXT", "STREAMS", "IDLE", "UNTIL", box=None, header_style="bold")
    for model in models:
        until = "Forever" if model["expires_at"].startswith("2999") else _until(model["expires_at"])
        table.add_row(model["name"], _size(model["size"]), "100% CPU", str(model.get("context_length", "")),
                      str(model.get("active_streams", 0)), _seconds(model.get("idle_seconds", 0.0)), until)
    Console().print(table)
    return 0


def _seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"


def _until(stamp: str) -> str:
    """An ISO time in the future as ``4 min from now``."""
    since = _seconds_since(stamp)
    return "-" if since is None else f"{_seconds(max(0.0, -since))} from now"


def _bench(args: argparse.Namespace) -> int:
    import time

    from ..generate._context import Context
    from ..generate._model import Model
    from ..hub._hub import DEFAULT_MODEL

    _check_ctx_size(args.ctx_size)
    model_name = _model_arg(args) or DEFAULT_MODEL
    with Model.load(model_name, **_placement(args)) as model, \
            Context(model, n_ctx=args.ctx_size, n_threads=args.threads) as context:
        _warn_ctx_size(args.ctx_size, model)
        context.generate("Hello", max_tokens=8)  # warm up
        first = []
        for _ in range(5):
            context.clear()
            started = time.perf_counter()
            with context.generate_stream("The capital of France is", max_tokens=1, temperature=0) as stream:
                next(stream)
            first.append(time.perf_counter() - started)
        speeds = []
        for _ in range(3):
            stream = context.generate_stream("Once upon a time", max_tokens=args.tokens, temperature=0,
                                             ignore_eos=True)
            for _ in stream:
                pass
            speeds.append(stream.tokens_per_second())
    first.sort()
    speeds.sort()
    result = {"model": _model_label(model_name), "path": str(model.path), "threads": context.n_threads,
              "context": context.n_ctx, "time_to_first_token_ms": first[2] * 1000,
              "decode_tokens_per_second": speeds[1], "tokens": args.tokens}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']}, {context.n_threads} threads: {speeds[1]:.1f} tokens/s decoding "
              f"({args.tokens} tokens), {first[2] * 1000:.1f} ms to the first token of a 5-token prompt")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..generate._context import default_threads
    from ..native._library import system_info

    if args.rpc:  # list these servers' devices too
        from ..native._devices import rpc_devices
        from ..native._library import get

        for address in (part.strip() for part in args.rpc.split(",") if part.strip()):
            rpc_devices(get(), address)
    info = system_info()
    info["default_threads"] = default_threads()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    build = info.get("build") or {}
    if isinstance(build, dict):
        info["build"] = (f"{build.get('build_type', '?')}, {'portable' if build.get('portable') else 'native'}"
                         f"{', ' + ' '.join(build['cmake_args']) if build.get('cmake_args') else ''}")
    devices = info.pop("devices")
    for key, value in info.items():
        print(f"{key.replace('_', ' '):>17}: {value}")
    print(f"{'devices':>17}:")
    for device in devices:
        memory = (f"{_size(device['memory_free'])} free of {_size(device['memory_total'])}"
                  if device["memory_total"] else "memory unknown")
        print(f"{'':>19}{device['name']} ({device['type']}, {device['backend']}): {device['description']}, {memory}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


MODEL_HELP = "a .gguf path or a model name, with or without its tag (default: smollm2:135m)"


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's unset flag must not undo the same flag given before the subcommand.
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="print statistics (tokens/s, time to first token) on standard error")
    parser.add_argument("--log-llama", action="store_true", default=argparse.SUPPRESS,
                        help="show llama.cpp's own log")


def _add_model(parser: argparse.ArgumentParser, *, word: bool = False) -> None:
    """``-m/--model``; with ``word``, also an optional first word naming the model (``chat``, ``bench``)."""
    if word:
        parser.add_argument("model_word", nargs="?", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("-m", "--model", help=MODEL_HELP)


def _model_arg(args: argparse.Namespace) -> str | None:
    """The model the command line names (``-m``, or the first word of ``chat`` and ``bench``), if any."""
    word = getattr(args, "model_word", None)
    if word and args.model and word != args.model:
        raise InvalidConfigError(f"two models: {word} and -m {args.model}; give one.")
    return args.model or word


def _add_context(parser: argparse.ArgumentParser,
                 ctx_help: str = "context size in tokens (default: the model's, at most 4096)") -> None:
    parser.add_argument("-c", "--ctx-size", type=int, help=ctx_help)
    parser.add_argument("-t", "--threads", type=int, help="CPU threads (default: all available, at most 8)")


def _add_template(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chat-template-file", metavar="FILE.jinja",
                        help="use this Jinja chat template instead of the model's (as llama-server's)")


def _add_offload(parser: argparse.ArgumentParser) -> None:
    """llama.cpp's offloading flags (GPUs of the build's backends, RPC servers)."""
    parser.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", type=int, default=0, metavar="N",
                        help="layers to offload to the GPUs and RPC servers (-1 or 99: all; default 0)")
    parser.add_argument("--main-gpu", "-mg", type=int, default=0, metavar="I",
                        help="the GPU for --split-mode none, and for intermediate results (default 0)")
    parser.add_argument("--split-mode", "-sm", choices=["none", "layer", "row"], default="layer",
                        help="how to split a model over several devices (default layer)")
    parser.add_argument("--tensor-split", "-ts", metavar="P,P,...",
                        help="proportions of the model per device, e.g. 3,1 (default: by free memory)")
    parser.add_argument("--rpc", metavar="HOST:PORT,...",
                        help="offload to upstream's ggml-rpc-server on these machines (unauthenticated: "
                             "private networks only)")


def _placement(args: argparse.Namespace) -> dict[str, Any]:
    """Model.load's offloading options from the command line's flags."""
    try:
        split = [float(part) for part in args.tensor_split.split(",")] if args.tensor_split else None
    except ValueError:
        raise InvalidConfigError(f"--tensor-split must be numbers separated by commas, not {args.tensor_split!r}."
                                 ) from None
    servers = [part.strip() for part in args.rpc.split(",") if part.strip()] if args.rpc else None
    return {"n_gpu_layers": args.n_gpu_layers, "main_gpu": args.main_gpu, "split_mode": args.split_mode,
            "tensor_split": split, "rpc_servers": servers}


def _add_sampling(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("-n", "--max-tokens", "--n-predict", dest="max_tokens", type=int, default=max_tokens,
                        help=f"at most this many tokens (default {max_tokens})")
    parser.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.7,
                        help="0 is greedy (default 0.7)")
    parser.add_argument("-s", "--seed", type=int, help="make sampling reproducible")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default 40)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling (default 0.9)")
    parser.add_argument("--min-p", type=float, help="drop tokens below min-p x the top one's probability (0.05)")
    parser.add_argument("--repeat-penalty", type=float, help="penalise repeated tokens (default 1.0: off)")
    parser.add_argument("-sys", "--system", help="a system message")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mullama", description="Stream tokens from local GGUF models.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mullama {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="print statistics on standard error")
    parser.add_argument("--log-llama", action="store_true", help="show llama.cpp's own log")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser("run", help="stream a reply to a prompt (a chat in a terminal without one)",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("words", nargs="*", metavar="[MODEL] PROMPT",
                     help="an optional model, then the prompt (words after -- are all the prompt)")
    _add_model(run)
    run.add_argument("-p", "--prompt", help="the prompt (placed before the other words; never taken for a model)")
    run.add_argument("-f", "--file", help="read the prompt from this file")
    _add_sampling(run, 512)
    _add_template(run)
    _add_context(run)
    _add_offload(run)
    run.add_argument("--stop", action="append", help="stop at this text (repeatable)")
    run.add_argument("--raw", action="store_true",
                     help="complete the prompt as is, without the chat template (always, for a model without one)")
    run.add_argument("--json", action="store_true", help="print the result and statistics as JSON")
    _add_verbosity(run)
    run.set_defaults(handler=_run)

    chat = commands.add_parser("chat", help="chat in the terminal (Markdown, streaming, multi-turn)")
    _add_model(chat, word=True)
    _add_sampling(chat, 1024)
    _add_template(chat)
    _add_context(chat)
    _add_offload(chat)
    chat.add_argument("--record", metavar="FILE.svg", help="save the session as an SVG picture on exit")
    _add_verbosity(chat)
    chat.set_defaults(handler=_chat)

    embed = commands.add_parser("embed", help="embedding vectors of texts, one JSON line per text")
    embed.add_argument("words", nargs="*", metavar="[MODEL] TEXT",
                       help="an optional model, then the texts (or one text per line on standard input)")
    _add_model(embed)
    embed.add_argument("--pooling", choices=["mean", "cls", "last", "none"],
                       help="how token vectors become one (default: the model's own, else mean)")
    embed.add_argument("--no-normalize", action="store_true", help="keep the vectors' length (default: unit length)")
    embed.add_argument("--batch-size", type=int, help="the longest text, in tokens (default 512)")
    embed.add_argument("--truncate", action="store_true", help="cut texts longer than the batch to their beginning")
    _add_verbosity(embed)
    embed.set_defaults(handler=_embed)

    pull = commands.add_parser("pull", help="download a model into the cache (verified)")
    pull.add_argument("name", help="a model name (smollm2:135m, gemma3:270m, qwen2.5:0.5b, ...) "
                                   "or hf:owner/repo[:file]")
    pull.add_argument("--force", action="store_true", help="download again even if cached")
    pull.set_defaults(handler=_pull)

    ls = commands.add_parser("list", help="models in the cache: name, size, digest, modified, path")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=_list)

    rm = commands.add_parser("rm", help="remove models from the cache")
    rm.add_argument("names", nargs="+")
    rm.set_defaults(handler=_rm)

    show = commands.add_parser("show", help="a model's metadata, read from its GGUF header (never downloads)")
    show.add_argument("name", help="a cached model name or a .gguf path")
    show.add_argument("--json", action="store_true")
    show.add_argument("--template", action="store_true", help="also print the chat template")
    show.set_defaults(handler=_show)

    serve = commands.add_parser("serve", help="an OpenAI-compatible streaming server (continuous batching)",
                                epilog="example:\n  mullama serve --model smollm2:135m --parallel 4\n"
                                       "  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: "
                                       "application/json' \\\n    -d '{\"messages\": [{\"role\": \"user\", "
                                       "\"content\": \"Hello!\"}], \"stream\": true}'",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(serve)
    serve.add_argument("--models", metavar="LIST",
                       help="serve several models, comma-separated (names, families, .gguf paths): a request's "
                            "'model' picks one, loaded on first use")
    serve.add_argument("--models-dir", metavar="DIR", help="serve every .gguf file in DIR (named by file stem)")
    serve.add_argument("--keep-alive", default="5m",
                       help="with --models: unload a model idle this long (seconds or 5m, 1h; negative: never; "
                            "default 5m); a request's keep_alive overrides it, as ollama's")
    serve.add_argument("--max-loaded", type=int, help="with --models: at most N loaded at once (least recently "
                                                      "used unloaded first)")
    serve.add_argument("--max-memory", metavar="SIZE",
                       help="with --models: keep loaded models (weights + KV cache) within SIZE, e.g. 2GB")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, let streams in flight finish for this long (default 30)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument("-np", "--parallel", type=int, default=4, help="streams decoded together (default 4)")
    _add_offload(serve)
    _add_template(serve)
    _add_context(serve, "context tokens of EACH stream (llama-server's -c is the total; default: the model's, "
                        "at most 4096)")
    serve.add_argument("--api-key", help="require this key (or set MULLAMA_API_KEY)")
    serve.add_argument("--max-tokens-limit", type=int, default=4096, help="cap on max_tokens (default 4096)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (default 64)")
    serve.add_argument("--pooling", choices=["mean", "cls", "last"],
                       help="pooling for /v1/embeddings (default: the model's own, else mean)")
    serve.add_argument("--embedding-batch", type=int,
                       help="tokens per embedding decode, and the longest input (default 512)")
    serve.add_argument("--embeddings", "--embedding", action="store_true",
                       help="accepted, as llama-server's: /v1/embeddings and /api/embed are always served")
    _add_verbosity(serve)
    serve.set_defaults(handler=_serve)

    ps = commands.add_parser("ps", help="models a running `mullama serve` has loaded: memory, idle time, until")
    ps.add_argument("--host", default="127.0.0.1", help="the server's address (default 127.0.0.1)")
    ps.add_argument("--port", type=int, default=8080, help="the server's port (default 8080)")
    ps.add_argument("--api-key", help="the server's key (or set MULLAMA_API_KEY)")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(handler=_ps)

    bench = commands.add_parser("bench", help="quick tokens/s and time to first token on this machine")
    _add_model(bench, word=True)
    bench.add_argument("-n", "--tokens", type=int, default=128, help="tokens to decode (default 128)")
    _add_context(bench)
    _add_offload(bench)
    bench.add_argument("--json", action="store_true")
    _add_verbosity(bench)
    bench.set_defaults(handler=_bench)

    info = commands.add_parser("info", help="library path, llama.cpp commit, system info, devices, cache")
    info.add_argument("--json", action="store_true")
    info.add_argument("--rpc", metavar="HOST:PORT,...", help="also list the devices of these RPC servers")
    info.set_defaults(handler=_info)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command line. For ``run`` and ``embed``, words after ``--`` are prompt (or text) words, never
    the model: ``words_before_dashes`` says whether the first word came before it."""
    dashes = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_known_args(argv[:dashes])
    tail = argv[dashes + 1:]
    if tail and not hasattr(args, "words"):  # another command: argparse's own meaning of --
        args, extra = parser.parse_known_args(argv)
        tail = []
    if extra and args.command == "run" and not any(word.startswith("-") for word in extra):
        args.words += extra  # `mullama run Why -n 20 is the sky blue`: words after an option are still the prompt
        extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(args, "words"):
        args.words_before_dashes = bool(args.words)
        args.words += tail
    args.argv = argv  # `serve --rpc` runs it again in a child
    return args


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = _parse(parser, list(argv) if argv is not None else sys.argv[1:])
    if args.command is None:
        parser.print_help()
        return 2
    if args.log_llama:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return args.handler(args)
    except MullamaError as error:
        print(f"mullama: error [{error.code}]: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
