"""``mullama serve``: OpenAI's, Anthropic's and ollama's HTTP APIs over the batching engine.

One module per wire format (``_openai``, ``_anthropic``, ``_ollama``, and ``_embeddings`` for the
embedding routes), each translating its requests into the one internal request (``_request``)
that ``_generation`` runs on a model of the pool (``_pool``: which model, loaded when, unloaded
when); ``_http`` holds what every route shares (API key, body limits, error shapes, metrics,
disconnects), ``_app`` assembles the routes and ``_run`` serves them on uvicorn.

Needs the ``server`` extra (starlette, uvicorn).
"""

from ._app import create_app
from ._http import AccessLog, ServerSettings, is_loopback
from ._pool import DEFAULT_KEEP_ALIVE, LoadOptions, ModelPool, ModelSpec, load_model, model_specs, parse_keep_alive
from ._run import check_port_free, serve
from ._supervisor import SUPERVISED_ENV, supervise

__all__ = [
           "DEFAULT_KEEP_ALIVE",
           "SUPERVISED_ENV",
           "AccessLog",
           "LoadOptions",
           "ModelPool",
           "ModelSpec",
           "ServerSettings",
           "check_port_free",
           "create_app",
           "is_loopback",
           "load_model",
           "model_specs",
           "parse_keep_alive",
           "serve",
           "supervise",
]
