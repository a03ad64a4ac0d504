"""The ``mullama`` command: ``run``, ``chat``, ``embed``, ``serve``, ``pull``, ``list``, ``show``, ``info``, ...

``main`` reads the command line and hands it to its command; an error is one line and an exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from .._exceptions import MullamaError
from ._errors import command_line_error
from ._generate import bench_command, chat_command, embed_command, run_command
from ._info import info_command
from ._models import list_command, pull_command, rm_command, show_command
from ._parser import make_parser, parse
from ._rerank import rerank_command
from ._serve import ps_command, serve_command

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": run_command, "chat": chat_command, "embed": embed_command, "rerank": rerank_command,
    "bench": bench_command,
    "pull": pull_command, "list": list_command, "rm": rm_command, "show": show_command,
    "serve": serve_command, "ps": ps_command, "info": info_command,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; its exit code. Every error, a usage error included, is one line
    on standard error, ``mullama: error [CODE]: message``, and exit code 1."""
    parser = make_parser()
    args = None
    try:
        args = parse(parser, list(argv) if argv is not None else sys.argv[1:])
        if args.command is None:
            parser.print_help()
            return 2
        if args.log_llama:
            logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        return COMMANDS[args.command](args)
    except MullamaError as error:
        error = command_line_error(error, args.command if args is not None else None)
        print(f"mullama: error [{error.code}]: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
