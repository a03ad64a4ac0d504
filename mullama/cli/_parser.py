"""The command line: the argparse tree of ``mullama`` and its commands, their flags (llama.cpp's names),
the examples; and the reading of a command line into its arguments."""

from __future__ import annotations

import argparse
from typing import NoReturn

from .. import __version__
from .._exceptions import InvalidConfigError
from ..generate._prompt_cache import DEFAULT_CACHE_RAM_MIB

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
  mullama rerank RERANKER.gguf "a query" "doc one" "doc two"  one JSON line per document, best first
  mullama pull qwen2.5:0.5b                     download a model (resumable, verified)
  mullama list                                  models in the cache
  mullama show smollm2:135m                     architecture, parameters, quantisation, context
  mullama info                                  library, llama.cpp commit, cache
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error (an unknown flag, a value of the wrong type) is an InvalidConfigError,
    which ``main`` prints as every other error: one line, ``mullama: error [INVALID_CONFIG]: ...``, exit 1."""

    def error(self, message: str) -> NoReturn:
        raise InvalidConfigError(f"{message} (see {self.prog} --help)")


MODEL_HELP = "a .gguf path or a model name, with or without its tag (default: smollm2:135m)"


class _Tagged(argparse.Action):
    """Appends (the option's name, its value): --lora and --lora-scaled share one list, kept in order."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items.append((option_string, values))
        setattr(namespace, self.dest, items)


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's unset flag must not undo the same flag given before the subcommand.
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="print statistics (tokens/s, time to first token) on standard error")
    parser.add_argument("--log-llama", action="store_true", default=argparse.SUPPRESS,
                        help="show llama.cpp's own log")


def _add_model(parser: argparse.ArgumentParser, *, word: bool = False) -> None:
    """``-m/--model``; with ``word``, also an optional first word naming the model (``chat``, ``bench``,
    ``serve``)."""
    if word:
        parser.add_argument("model_word", nargs="?", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("-m", "--model", help=MODEL_HELP)


def _threads(text: str) -> int | str:
    """``--threads``: a count, or ``auto``."""
    return "auto" if text == "auto" else int(text)


def _add_context(parser: argparse.ArgumentParser,
                 ctx_help: str = "context size in tokens (default: the model's, at most 4096)") -> None:
    parser.add_argument("-c", "--ctx-size", type=int, help=ctx_help)
    parser.add_argument("-t", "--threads", type=_threads,
                        help="CPU threads (default: $MULLAMA_THREADS, else all available, at most 8; "
                             "'auto': chosen by timing the steps)")
    parser.add_argument("-fa", "--flash-attn", choices=["on", "off", "auto"], default="auto",
                        help="flash attention (llama-server's; default auto: on where the device runs it). On a "
                             "CPU, off decodes faster deep into a context and makes speculation pay more")


def _add_template(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chat-template-file", metavar="FILE.jinja",
                        help="use this Jinja chat template instead of the model's (as llama-server's)")


def _add_mmproj(parser: argparse.ArgumentParser, help: str = "the model's multimodal projector (an mmproj GGUF, "
                "llama.cpp's): images in (default: the one pulled with a Hugging Face model, if any)") -> None:
    parser.add_argument("--mmproj", metavar="FILE", help=help)
    parser.add_argument("--no-mmproj", action="store_true",
                        help="do not load the projector pulled with the model (llama-server's --no-mmproj)")


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


def _add_speculative(parser: argparse.ArgumentParser) -> None:
    """llama-server's speculative decoding flags, for the kind mullama has (docs/speculative.md)."""
    parser.add_argument("--spec-type", choices=["none", "ngram", "ngram-simple", "draft-simple"], default="none",
                        help="speculative decoding: ngram drafts from the prompt and output, each cut to the "
                             "length that pays, ngram-simple drafts at every match (llama-server's), draft-simple "
                             "with -md; each draft is checked in one decode (the same tokens, faster when the "
                             "drafts are right)")
    parser.add_argument("-md", "--model-draft", "--spec-draft-model", dest="model_draft", metavar="FNAME",
                        help="a draft model with the same vocabulary (implies --spec-type draft-simple; "
                             "llama-server's)")
    parser.add_argument("--spec-ngram-simple-size-n", "--draft-min", dest="draft_min", type=int, metavar="N",
                        help="n-gram looked up, and the shortest draft (default 4)")
    parser.add_argument("--spec-ngram-simple-size-m", "--spec-draft-n-max", "--draft-max", dest="draft_max",
                        type=int, metavar="N", help="the longest draft (default 16)")


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
    _add_speculative(run)
    _add_template(run)
    _add_context(run)
    _add_offload(run)
    run.add_argument("--stop", action="append", help="stop at this text (repeatable)")
    run.add_argument("--raw", action="store_true",
                     help="complete the prompt as is, without the chat template (always, for a model without one)")
    run.add_argument("--json", action="store_true", help="print the result and statistics as JSON")
    _add_mmproj(run)
    run.add_argument("--image", action="append", metavar="PATH",
                     help="an image to ask about, after the prompt (repeatable; needs a projector)")
    _add_verbosity(run)

    chat = commands.add_parser("chat", help="chat in the terminal (Markdown, streaming, multi-turn)")
    _add_model(chat, word=True)
    _add_sampling(chat, 1024)
    _add_template(chat)
    _add_context(chat)
    _add_offload(chat)
    chat.add_argument("--record", metavar="FILE.svg", help="save the session as an SVG picture on exit")
    _add_mmproj(chat)
    _add_verbosity(chat)

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

    rerank = commands.add_parser("rerank", help="documents ranked by relevance to a query (a reranking model), "
                                                 "one JSON line each, most relevant first")
    rerank.add_argument("model_name", metavar="MODEL", help=MODEL_HELP)
    rerank.add_argument("query", metavar="QUERY")
    rerank.add_argument("documents", nargs="*", metavar="DOC", help="the documents (or one per line on standard input)")
    rerank.add_argument("--top-n", type=int, help="print only the N most relevant")
    rerank.add_argument("--normalize", action="store_true", help="scores through the logistic function, in (0, 1)")
    rerank.add_argument("--batch-size", type=int, help="the longest query and document pair, in tokens (default 512)")
    rerank.add_argument("--truncate", action="store_true", help="cut longer pairs to their beginning")
    _add_verbosity(rerank)

    pull = commands.add_parser("pull", help="download a model into the cache (verified)")
    pull.add_argument("name", help="a model name (smollm2:135m, gemma3:270m, qwen2.5:0.5b, ...) "
                                   "or hf:owner/repo[:file]")
    pull.add_argument("--force", action="store_true", help="download again even if cached")

    ls = commands.add_parser("list", help="models in the cache: name, size, digest, modified, path")
    ls.add_argument("--json", action="store_true")

    rm = commands.add_parser("rm", help="remove models from the cache")
    rm.add_argument("names", nargs="+")

    show = commands.add_parser("show", help="a model's metadata, read from its GGUF header (never downloads)")
    show.add_argument("name", help="a cached model name or a .gguf path")
    show.add_argument("--json", action="store_true")
    show.add_argument("--template", action="store_true", help="also print the chat template")

    serve = commands.add_parser("serve", help="an OpenAI-compatible streaming server (continuous batching)",
                                epilog="example:\n  mullama serve --model smollm2:135m --parallel 4\n"
                                       "  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: "
                                       "application/json' \\\n    -d '{\"messages\": [{\"role\": \"user\", "
                                       "\"content\": \"Hello!\"}], \"stream\": true}'",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(serve, word=True)
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
    serve.add_argument("--restart-limit", type=int, default=10, metavar="N",
                       help="with --rpc: give up (exit 1) after N failed starts in a row of the serving process "
                            "(default 10; waits double from 0.5 s to 30 s between starts)")
    serve.add_argument("-np", "--parallel", type=int, default=4, help="streams decoded together (default 4)")
    _add_offload(serve)
    _add_template(serve)
    _add_context(serve, "context tokens of EACH stream (llama-server's -c is the total; default: the model's, "
                        "at most 4096)")
    _add_speculative(serve)
    serve.add_argument("--api-key", help="require this key (or set MULLAMA_API_KEY)")
    serve.add_argument("--max-tokens-limit", type=int, default=4096, help="cap on max_tokens (default 4096)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (default 64)")
    serve.add_argument("-cram", "--cache-ram", type=int, default=DEFAULT_CACHE_RAM_MIB, metavar="MiB",
                       help="host memory for earlier prompts' KV states, restored when a new prompt shares "
                            f"their beginning (llama-server's; default {DEFAULT_CACHE_RAM_MIB}, 0: off, -1: no limit)")
    serve.add_argument("--slot-save-path", metavar="DIR",
                       help="directory of POST /slots/{id}?action=save|restore (llama-server's; default: disabled)")
    serve.add_argument("--lora", metavar="FNAME", dest="lora_flags", action=_Tagged,
                       help="a LoRA adapter GGUF, applied at scale 1 (comma-separated, repeatable; llama-server's)")
    serve.add_argument("--lora-scaled", metavar="FNAME:SCALE", dest="lora_flags", action=_Tagged,
                       help="a LoRA adapter with its scale (comma-separated, repeatable; llama-server's)")
    serve.add_argument("--lora-init-without-apply", action="store_true",
                       help="load the LoRA adapters at scale 0; POST /lora-adapters sets scales")
    _add_mmproj(serve, "the model's multimodal projector (an mmproj GGUF, llama-server's): requests may hold "
                       "images (OpenAI image_url, Anthropic image blocks, ollama images) or audio (OpenAI "
                       "input_audio), as the projector takes; default: the one pulled "
                       "with each Hugging Face model, if any")
    serve.add_argument("--media-path", metavar="DIR",
                       help="read image_url file paths below this directory (llama-server's; default: no files)")
    serve.add_argument("--allow-remote-media", action="store_true",
                       help="fetch image_url http(s) URLs (at most --max-media-bytes each; default: refused)")
    serve.add_argument("--max-media-bytes", type=int, default=20 << 20, metavar="N",
                       help="the largest image or clip, encoded (default 20 MiB; with a projector a request body "
                            "may hold one such image in base64 beside 1 MiB of text)")
    serve.add_argument("--max-audio-seconds", type=float, default=900.0, metavar="S",
                       help="the longest audio clip, by its headers, refused before it is decoded (default 900)")
    serve.add_argument("--pooling", choices=["mean", "cls", "last"],
                       help="pooling for /v1/embeddings (default: the model's own, else mean)")
    serve.add_argument("--embedding-batch", type=int,
                       help="tokens per embedding decode, and the longest input (default 512)")
    serve.add_argument("--embeddings", "--embedding", action="store_true",
                       help="accepted, as llama-server's: /v1/embeddings and /api/embed are always served")
    serve.add_argument("--rerank", "--reranking", action="store_true",
                       help="accepted, as llama-server's: /v1/rerank is served for a model whose GGUF has rank pooling")
    _add_verbosity(serve)

    ps = commands.add_parser("ps", help="models a running `mullama serve` has loaded: memory, idle time, until")
    ps.add_argument("--host", default="127.0.0.1", help="the server's address (default 127.0.0.1)")
    ps.add_argument("--port", type=int, default=8080, help="the server's port (default 8080)")
    ps.add_argument("--api-key", help="the server's key (or set MULLAMA_API_KEY)")
    ps.add_argument("--json", action="store_true")

    bench = commands.add_parser("bench", help="quick tokens/s and time to first token on this machine")
    _add_model(bench, word=True)
    bench.add_argument("-n", "--tokens", type=int, default=128, help="tokens to decode (default 128)")
    _add_context(bench)
    _add_offload(bench)
    bench.add_argument("--json", action="store_true")
    _add_verbosity(bench)

    info = commands.add_parser("info", help="library path, llama.cpp commit, system info, devices, cache")
    info.add_argument("--json", action="store_true")
    info.add_argument("--rpc", metavar="HOST:PORT,...", help="also list the devices of these RPC servers")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command line. For ``run`` and ``embed``, words after ``--`` are prompt (or text) words, never
    the model: ``words_before_dashes`` says whether the first word came before it."""
    dashes = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_known_args(argv[:dashes])
    tail = argv[dashes + 1:]
    if tail and not hasattr(args, "words"):  # another command: argparse's own meaning of --
        args, extra = parser.parse_known_args(argv)
        tail = []
    if extra and hasattr(args, "words") and not any(word.startswith("-") for word in extra):
        args.words += extra  # `mullama run Why -n 20 is the sky blue`: words after an option are still the prompt
        extra = []
    if extra:
        prog = f"{parser.prog} {args.command}" if args.command else parser.prog
        raise InvalidConfigError(f"unrecognized arguments: {' '.join(extra)} (see {prog} --help)")
    if hasattr(args, "words"):
        args.words_before_dashes = bool(args.words)
        args.words += tail
    args.argv = argv  # `serve --rpc` runs it again in a child
    return args
