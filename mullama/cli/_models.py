"""The commands over the model cache: ``pull``, ``list``, ``rm`` and ``show``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .._exceptions import ModelNotFoundError
from ._format import ago, size

if TYPE_CHECKING:
    from ..hub._cache import CachedProjector


def pull_command(args: argparse.Namespace) -> int:
    from ..hub._pull import pull

    path = pull(args.name, force=args.force)
    print(path)
    return 0


def list_command(args: argparse.Namespace) -> int:
    from ..hub._cache import list_models

    models = list_models()
    if args.json:
        print(json.dumps([{"name": m.name, "size": m.size, "path": str(m.path), "sha256": m.sha256,
                           "source": m.source, "pulled_at": m.pulled_at, "projector": _projector_json(m.projector)}
                          for m in models], indent=2))
        return 0
    if not models:
        print("no models in the cache yet: `mullama pull smollm2:135m`")
        return 0
    from rich.console import Console
    from rich.table import Table

    projectors = any(m.projector is not None for m in models)
    table = Table("NAME", "ID", "SIZE", "MODIFIED", *(["PROJECTOR"] if projectors else []), box=None,
                  header_style="bold")
    for m in models:
        table.add_row(m.name, m.sha256[:12], size(m.size), ago(m.pulled_at),
                      *([_projector_cell(m.projector)] if projectors else []))
    Console().print(table)
    print("(`mullama show NAME` prints a model's path and metadata; `mullama list --json` lists paths)")
    return 0


def _projector_json(projector: CachedProjector | None) -> dict | None:
    if projector is None:
        return None
    return {"file": projector.file, "path": str(projector.path), "size": projector.size, "sha256": projector.sha256,
            "source": projector.source, "complete": projector.complete}


def _projector_cell(projector: CachedProjector | None) -> str:
    """The projector's size (its file: ``show`` and ``list --json``), or that its download did not finish."""
    if projector is None:
        return ""
    return size(projector.size or 0) if projector.complete else "unfinished: pull again"


def rm_command(args: argparse.Namespace) -> int:
    from ..hub._cache import remove

    for name in args.names:
        print(f"removed {name} ({remove(name)})")
    return 0


def show_command(args: argparse.Namespace) -> int:
    from ..gguf._reader import read_gguf_info
    from ..hub._cache import cached, projector_of
    from ..hub._catalog import entry_for, is_local_path

    name = args.name
    path = Path(name).expanduser() if is_local_path(name) else cached(name)
    if path is None:  # show never downloads
        if not name.startswith("hf:"):
            entry_for(name)  # a name the catalog does not know: MODEL_NOT_FOUND with the names and forms it knows
        raise ModelNotFoundError(f"{name} is not in the cache; `mullama pull {name}` downloads it "
                                 "(`mullama list` shows what is there).")
    info = read_gguf_info(path)
    summary = {"path": str(info.path), **info.summary()}
    projector = None if is_local_path(name) else projector_of(path)
    if projector is not None:  # pulled with the model: Model.load(name) and `run NAME` use it
        summary["projector"] = str(projector.path) if projector.complete else (
            f"{projector.file}, not finished: `mullama pull {name}` resumes it")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        summary["parameters"] = f"{info.n_params / 1e6:.1f}M"
        summary["size_bytes"] = size(info.size_bytes)
        for key, value in summary.items():
            print(f"{key.replace('_', ' '):>15}: {value}")
    if args.template and info.chat_template:
        print(info.chat_template)
    return 0
