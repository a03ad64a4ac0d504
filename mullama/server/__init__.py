"""``mullama serve``: OpenAI's, Anthropic's and ollama's HTTP APIs over the batching engine.

One module per wire format (``_openai``, ``_responses``, ``_anthropic``, ``_ollama``, and
``_embeddings`` for the embedding routes), each translating its requests into the one internal request (``_request``)
that ``_generation`` runs on a model of the pool (``_pool``: which model, loaded when, unloaded
when; ``_specs``: the models served and how each loads; ``_keep_alive``: for how long), and owning
its response shapes (OpenAI's in ``_openai_shapes``; the Responses API's in ``_responses``) built
from the engine's tokens and the neutral tool-call events of ``_tool_calls``. ``_http`` holds what
every route shares (API key, body limits, each route's declared ``WireFormat``, metrics, the
stream-or-collect answer, disconnects), ``_app`` assembles the routes and ``_run`` serves them on
uvicorn; ``_supervisor`` proxies to a child server under ``--rpc``.

Needs the ``server`` extra (starlette, uvicorn).
"""

from ._app import create_app
from ._http import AccessLog, ServerSettings, is_loopback
from ._keep_alive import DEFAULT_KEEP_ALIVE, parse_keep_alive
from ._pool import ModelPool
from ._run import check_port_free, serve
from ._specs import LoadOptions, ModelSpec, load_model, model_specs
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
