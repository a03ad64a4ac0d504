"""The commands that generate: ``run``, ``chat``, ``embed`` and ``bench``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from .._exceptions import InvalidConfigError
from ._args import (
    check_ctx_size,
    check_generates,
    check_writable,
    flash_attn_option,
    mmproj_option,
    model_and_words,
    model_arg,
    model_label,
    placement,
    stream_config,
    warn_ctx_size,
)
from ._errors import checked_config
from ._format import note


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


def run_command(args: argparse.Namespace) -> int:
    from ..generate._context import Context
    from ..generate._model import Model

    model_name, words = model_and_words(args)
    if args.prompt is not None:
        words.insert(0, args.prompt)
    check_ctx_size(args.ctx_size)
    if not words and args.file is None and sys.stdin.isatty():
        return chat_command(args, model_name)  # `mullama run MODEL` in a terminal: a chat, as with ollama
    prompt = _prompt(words, args.file)
    if not prompt.strip():
        raise InvalidConfigError("no prompt: give one as arguments, with -f FILE, or on standard input.")
    config = stream_config(args, stop=args.stop)
    label = model_label(model_name)
    with contextlib.ExitStack() as resources:
        mmproj = mmproj_option(args)
        model = resources.enter_context(Model.load(model_name, chat_template=args.chat_template_file,
                                                   mmproj=mmproj, **placement(args)))
        check_generates(model, label)
        if args.image and not model.supports_vision:
            raise InvalidConfigError(f"--image needs the model's projector: {label} has none loaded; add --mmproj "
                                     "FILE (an mmproj GGUF)" + (" and leave out --no-mmproj." if mmproj is False
                                                                else "."))
        draft = resources.enter_context(Model.load(args.model_draft)) if args.model_draft else None
        context = resources.enter_context(Context(model, n_ctx=args.ctx_size, n_threads=args.threads,
                                                  flash_attn=flash_attn_option(args), draft_model=draft))
        warn_ctx_size(args.ctx_size, model)
        raw = args.raw or model.chat_template is None
        if raw and not args.raw:  # a base model: complete the text, as ollama does
            note(f"{label} has no chat template (a base model): completing the prompt as is, as --raw does"
                 + (", without the system message" if args.system else ""))
        if raw and args.image:
            raise InvalidConfigError("--image needs the chat template (not --raw, nor a base model).")
        if raw:
            stream = context.generate_stream(prompt, config=config)
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            images = [{"type": "image_url", "image_url": {"url": os.path.abspath(path)}} for path in args.image or []]
            content = [{"type": "text", "text": prompt}, *images] if images else prompt
            messages.append({"role": "user", "content": content})
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
                       "tokens_per_second": stream.tokens_per_second(), "draft_proposed": stream.draft_proposed,
                       "draft_accepted": stream.draft_accepted}, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stream.finish_reason == "length" and not args.json:  # cut short: say why, off standard output
            note("… (max tokens)" if stream.tokens_generated() >= config.max_tokens else
                 f"… (context full: {context.n_ctx} tokens; a larger -c/--ctx-size leaves more room)")
        if args.verbose:
            ttft = stream.time_to_first_token()
            print(f"[{stream.tokens_generated()} tokens, {stream.tokens_per_second():.1f} tokens/s, "
                  f"first token after {(ttft or 0) * 1000:.0f} ms, {stream.prompt_tokens} prompt tokens"
                  + (f", {stream.draft_accepted}/{stream.draft_proposed} drafted tokens accepted"
                     if config.speculative else "") + "]", file=sys.stderr)
    return 0


def chat_command(args: argparse.Namespace, model_name: str | None = None) -> int:
    from ..hub._catalog import DEFAULT_MODEL
    from ._terminal_chat import chat_main

    check_ctx_size(args.ctx_size)
    record = getattr(args, "record", None)
    if record is not None:
        check_writable(record, "--record")
    return chat_main(model_name or model_arg(args) or DEFAULT_MODEL, system=args.system,
                     config=stream_config(args), ctx_size=args.ctx_size, threads=args.threads, record=record,
                     chat_template=args.chat_template_file, placement=placement(args),
                     mmproj=mmproj_option(args), flash_attn=flash_attn_option(args))


def embed_command(args: argparse.Namespace) -> int:
    from ..generate._model import Model

    model_name, texts = model_and_words(args)
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


def bench_command(args: argparse.Namespace) -> int:
    import time

    from ..generate._context import Context
    from ..generate._model import Model
    from ..hub._catalog import DEFAULT_MODEL

    check_ctx_size(args.ctx_size)
    checked_config({"max_tokens": "-n/--tokens"}, max_tokens=args.tokens)
    model_name = model_arg(args) or DEFAULT_MODEL
    with contextlib.ExitStack() as resources:
        model = resources.enter_context(Model.load(model_name, **placement(args)))
        check_generates(model, model_label(model_name))
        context = resources.enter_context(Context(model, n_ctx=args.ctx_size, n_threads=args.threads,
                                                  flash_attn=flash_attn_option(args)))
        warn_ctx_size(args.ctx_size, model)
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
    result = {"model": model_label(model_name), "path": str(model.path), "threads": context.n_threads,
              "context": context.n_ctx, "time_to_first_token_ms": first[2] * 1000,
              "decode_tokens_per_second": speeds[1], "tokens": args.tokens}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']}, {context.n_threads} threads: {speeds[1]:.1f} tokens/s decoding "
              f"({args.tokens} tokens), {first[2] * 1000:.1f} ms to the first token of a 5-token prompt")
    return 0
