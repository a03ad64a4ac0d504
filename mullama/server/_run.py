"""``mullama serve``: check the settings, load what must be loaded, and run the app on uvicorn
until SIGINT/SIGTERM (streams in flight finish first)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from .._exceptions import InvalidConfigError
from ..generate._media import MediaLimits
from ..generate._prompt_cache import DEFAULT_CACHE_RAM_MIB
from ._app import create_app
from ._http import AccessLog, ServerSettings, is_loopback
from ._keep_alive import DEFAULT_KEEP_ALIVE
from ._pool import ModelPool
from ._specs import LoadOptions, ModelSpec, load_model, model_specs

__all__ = ["check_port_free", "serve"]


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on before any model is loaded (not after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InvalidConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); pass --port with a free "
                                     "port, or stop what uses this one.") from None


def serve(model_ref: str | None = None, *, models: Sequence[str] = (), models_dir: str | None = None,
          host: str = "127.0.0.1", port: int = 8080, parallel: int = 4, ctx_size: int | None = None,
          flash_attn: bool | None = None,
          api_key: str | None = None, max_tokens_limit: int = 4096, threads: int | str | None = None,
          max_queue: int = 64,
          cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB,
          max_body_bytes: int = 1 << 20, pooling: str | None = None, embedding_batch: int | None = None,
          chat_template: str | None = None, keep_alive: float | None = DEFAULT_KEEP_ALIVE,
          max_loaded: int | None = None, max_memory: int | None = None,
          placement: dict[str, Any] | None = None, drain_timeout: float = 30.0,
          slot_save_path: str | os.PathLike[str] | None = None, lora: Sequence[tuple[str, float]] = (),
          lora_init_without_apply: bool = False, speculative: dict[str, Any] | None = None,
          draft_model: str | None = None, mmproj: str | Literal[False] | None = None,
          media: MediaLimits | None = None, media_body_bytes: int = 0) -> int:
    """Serve one model (``model_ref``: loaded now, answering every request), or several (``models``
    and/or ``models_dir``: each loaded when a request first names it, unloaded after ``keep_alive``
    idle seconds or to stay within ``max_loaded`` / ``max_memory``). On SIGINT/SIGTERM it stops
    listening, refuses new requests on open connections (503), and lets streams in flight finish for
    up to ``drain_timeout`` seconds.

    ``mmproj``: the projector of the models (None: the one pulled with each Hugging Face model, if any;
    False: none). When a model takes media, a request body may be ``media_body_bytes`` larger."""
    import uvicorn

    from ..generate._context_params import ContextSettings
    from ..generate._embed import check_options

    if not is_loopback(host) and not api_key:
        raise InvalidConfigError(f"refusing to listen on {host} without an API key: anyone on the network could "
                                 "use it. Pass --api-key (or set MULLAMA_API_KEY), or bind 127.0.0.1.")
    if isinstance(drain_timeout, bool) or not isinstance(drain_timeout, (int, float)) \
            or not 0 <= drain_timeout <= 86400:
        raise InvalidConfigError(f"--drain-timeout must be 0 to 86400 seconds, not {drain_timeout!r}.")
    if model_ref is not None and (models or models_dir):
        raise InvalidConfigError("give one model, or --models / --models-dir, not both.")
    ContextSettings(n_ctx=ctx_size, n_threads=threads, n_seq_max=parallel,
                    flash_attn=flash_attn)  # bad values fail before any load
    check_options(True, embedding_batch, False)
    options = LoadOptions(parallel=parallel, ctx_size=ctx_size, threads=threads, flash_attn=flash_attn,
                          max_queue=max_queue,
                          cache_ram_mib=cache_ram_mib,
                          pooling=pooling, chat_template=chat_template, placement=placement or {},
                          lora=tuple(lora), lora_init_without_apply=lora_init_without_apply,
                          speculative=speculative, draft_model=draft_model, mmproj=mmproj)
    settings = ServerSettings(api_key=api_key, max_body_bytes=max_body_bytes, max_tokens_limit=max_tokens_limit,
                              pooling=pooling, embedding_batch=embedding_batch)
    if media is not None:
        settings.media = media
    if slot_save_path is not None:  # llama-server's --slot-save-path: an existing directory
        if not Path(slot_save_path).is_dir():
            raise InvalidConfigError(f"--slot-save-path: not a directory: {os.fspath(slot_save_path)}")
        settings.slot_save_path = Path(slot_save_path).resolve()
    if models or models_dir:
        specs = model_specs(models, models_dir)
        pool = ModelPool(specs, load=lambda spec: load_model(spec, options), keep_alive=keep_alive,
                         max_loaded=max_loaded, max_memory=max_memory)
        _check_budget(pool)
        check_port_free(host, port)
        serving = (f"{len(specs)} models ({pool.names()}), loaded on demand, {parallel} parallel streams each"
                   f"{f', at most {max_loaded} loaded' if max_loaded else ''}")
        model = engine = None
        if mmproj or (mmproj is None and any(spec.projector() for spec in specs)):
            settings.max_body_bytes += media_body_bytes
        app = create_app(pool, settings=settings)
    else:
        if model_ref is None:
            raise InvalidConfigError("no model to serve: give a model, --models or --models-dir.")
        check_port_free(host, port)
        model, engine = load_model(ModelSpec(str(model_ref), str(model_ref)), options)
        settings.model_name = str(model_ref)
        if model.projector is not None:
            settings.max_body_bytes += media_body_bytes
        serving = (f"{model_ref}, {parallel} parallel streams, {engine.n_ctx_per_slot} tokens each"
                   if engine is not None else f"{model_ref}, embeddings only, {model.pooling} pooling")
        app = create_app(model, engine, settings)
    config = uvicorn.Config(AccessLog(app), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=math.ceil(drain_timeout), ws_max_size=max_body_bytes)
    shown = f"[{host}]" if ":" in host else host
    ready = f"mullama serving {serving} on http://{shown}:{port}/v1"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:  # the socket is listening: say so
                print(ready, flush=True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.mullama.draining = True  # /health says so at once; open connections get 503s
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # SIGINT/SIGTERM: stop accepting, let in-flight streams finish, exit 0 (uvicorn's own
            # handler re-raises the signal afterwards, which ends the process with -15).
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    try:
        Server(config).run()
    finally:
        if engine is not None:
            engine.stop(drain=True, timeout=drain_timeout)
            engine.close()
        if model is not None:
            model.close()
    return 0


def _check_budget(pool: ModelPool) -> None:
    """A --max-memory below a model's own file can never be met: say so at start."""
    if pool.max_memory is None:
        return
    for spec in pool.specs:
        path = spec.path()
        if path is not None and path.is_file() and path.stat().st_size > pool.max_memory:
            raise InvalidConfigError(f"--max-memory {pool.max_memory} bytes is less than {spec.name}'s weights "
                                     f"({path.stat().st_size} bytes); raise it or leave that model out.")
