"""The ``mullama`` command: run, chat, serve, pull and the rest, over the library's public API."""

from ._main import main

__all__ = ["main"]
