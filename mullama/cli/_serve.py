"""The server's commands: ``serve``, and ``ps`` (the models a running server has loaded)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .._exceptions import InvalidConfigError

if TYPE_CHECKING:
    from ..generate._media import MediaLimits
from ._args import check_ctx_size, flash_attn_option, mmproj_option, model_arg, placement, speculative_options
from ._format import duration, size, until


def serve_command(args: argparse.Namespace) -> int:
    try:
        from ..server import SUPERVISED_ENV, parse_keep_alive, serve, supervise
    except ImportError as exc:
        raise InvalidConfigError(f"`mullama serve` needs the server extra ({exc.name} is missing): "
                                 "pip install 'mullama[server]'.") from None
    from ..hub._catalog import DEFAULT_MODEL

    check_ctx_size(args.ctx_size)
    if args.rpc and os.environ.get(SUPERVISED_ENV) != "1":  # a lost RPC server ends the serving process
        return supervise(args.argv, host=args.host, port=args.port, drain_timeout=args.drain_timeout,
                         api_key=args.api_key or os.environ.get("MULLAMA_API_KEY"), restart_limit=args.restart_limit)
    if args.rpc:  # the supervised serving process: it ends when an RPC server is lost (see end_when_rpc_is_lost)
        from ..native._devices import one_line_aborts
        from ..native._library import get
        from ..native._rpc_relay import on_lost

        one_line_aborts(get())
        on_lost(end_when_rpc_is_lost)
    models = [name.strip() for name in (args.models or "").split(",") if name.strip()]
    several = bool(models or args.models_dir)
    keep_alive = parse_keep_alive(args.keep_alive)
    return serve(model_arg(args) or (None if several else DEFAULT_MODEL), models=models, models_dir=args.models_dir,
                 host=args.host, port=args.port, parallel=args.parallel, flash_attn=flash_attn_option(args),
                 ctx_size=args.ctx_size, api_key=args.api_key or os.environ.get("MULLAMA_API_KEY"),
                 max_tokens_limit=args.max_tokens_limit, threads=args.threads, max_queue=args.max_queue,
                 cache_ram_mib=args.cache_ram, slot_save_path=args.slot_save_path,
                 pooling=args.pooling, embedding_batch=args.embedding_batch, chat_template=args.chat_template_file,
                 keep_alive=keep_alive, max_loaded=args.max_loaded, placement=placement(args),
                 drain_timeout=args.drain_timeout, lora=_lora_args(args),
                 lora_init_without_apply=args.lora_init_without_apply, speculative=speculative_options(args),
                 draft_model=args.model_draft, mmproj=mmproj_option(args),
                 max_body_bytes=1 << 20, media_body_bytes=args.max_media_bytes * 4 // 3,
                 media=media_limits(args.media_path, args.allow_remote_media, args.max_media_bytes,
                                    args.max_audio_seconds),
                 max_memory=_parse_size(args.max_memory) if args.max_memory else None)


def end_when_rpc_is_lost(address: str) -> None:
    """In ``serve --rpc``'s serving process, a lost RPC server ends the process (its supervisor starts it
    again once the server answers), rather than unloading the model and serving on: every model
    offloaded there is garbage now, the supervisor already reports the outage (``/health`` degraded,
    503s to retry, backoff and --restart-limit) and reloads in a fresh process, and the streams under
    way end with the error event they got when ggml ended the process."""
    sys.stderr.write(f"mullama: lost the RPC server at {address}; the serving process ends, to be started again\n")
    sys.stderr.flush()
    os._exit(1)


def media_limits(media_path: str | None, allow_remote: bool, max_bytes: int,
                 max_audio_seconds: float = 900.0) -> MediaLimits:
    """The server's bounds on media: files only below ``--media-path``, remote URLs only when allowed,
    sizes and clip lengths."""
    from ..generate._media import MediaLimits

    if media_path is not None and not Path(media_path).is_dir():
        raise InvalidConfigError(f"--media-path: not a directory: {media_path}")
    if max_bytes < 1:
        raise InvalidConfigError(f"--max-media-bytes must be at least 1, not {max_bytes}.")
    if not max_audio_seconds > 0:
        raise InvalidConfigError(f"--max-audio-seconds must be more than 0, not {max_audio_seconds}.")
    return MediaLimits(max_bytes=max_bytes, allow_remote=allow_remote, allow_files=media_path is not None,
                       file_root=Path(media_path) if media_path is not None else None,
                       max_audio_seconds=max_audio_seconds)


def _lora_args(args: argparse.Namespace) -> list[tuple[str, float]]:
    """--lora FNAME[,FNAME...] and --lora-scaled FNAME:SCALE[,...] (llama-server's), in the order given."""
    adapters: list[tuple[str, float]] = []
    for flag, value in args.lora_flags or []:
        for item in (part for part in value.split(",") if part):
            if flag == "--lora":
                adapters.append((item, 1.0))
                continue
            path, colon, scale = item.rpartition(":")
            try:
                adapters.append((path, float(scale)) if colon and path else ("", float("nan")))
            except ValueError:
                adapters.append(("", float("nan")))
            if not adapters[-1][0]:
                raise InvalidConfigError(f"--lora-scaled takes FNAME:SCALE (comma-separated), not {item!r}.")
    return adapters


def _parse_size(text: str) -> int:
    """``2GB``, ``1.5G``, ``500MB``, ``750M`` or bytes, as a number of bytes (decimal units, as ``list``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise InvalidConfigError(f"--max-memory must be a size such as 2GB or 500MB, not {text!r}.")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def ps_command(args: argparse.Namespace) -> int:
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
        expires = "Forever" if model["expires_at"].startswith("2999") else until(model["expires_at"])
        table.add_row(model["name"], size(model["size"]), "100% CPU", str(model.get("context_length", "")),
                      str(model.get("active_streams", 0)), duration(model.get("idle_seconds", 0.0)), expires)
    Console().print(table)
    return 0
