"""``mullama rerank MODEL QUERY DOC...``: documents ranked by relevance to a query, one JSON line each.

A reranker (a GGUF with rank pooling) scores each (query, document) pair as llama-server's
``/rerank`` does (see mullama.generate._rerank); the lines come most relevant first, each
``{"index", "relevance_score", "document"}``, ``index`` being the document's place on the command
line. Documents may come one per line on standard input instead, for shell pipelines.
"""

from __future__ import annotations

import argparse
import json
import sys

from .._exceptions import InvalidConfigError

__all__ = ["rerank_command"]


def rerank_command(args: argparse.Namespace) -> int:
    from ..generate._model import Model

    documents = list(args.documents)
    if not documents and not sys.stdin.isatty():
        documents = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not documents:
        raise InvalidConfigError("no documents: give them after the query, or one per line on standard input.")
    with Model.load(args.model_name) as model:
        ranked = model.rerank(args.query, documents, top_n=args.top_n, normalize=args.normalize,
                              batch_size=args.batch_size, truncate=args.truncate)
    for item in ranked:
        line = {"index": item.index, "relevance_score": item.score, "document": item.document}
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    return 0
