"""The gguf package of the pinned llama.cpp tree, for the tools that write test models."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def import_gguf() -> object:
    """The gguf package of the pinned llama.cpp tree (its writer matches our pin's format)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llama_source import LLAMA_CPP_COMMIT
    from mullama._paths import llama_cache_dir

    tree = llama_cache_dir() / "src" / LLAMA_CPP_COMMIT / "gguf-py"
    if not tree.is_dir():
        raise SystemExit(f"{tree} is missing (the pinned llama.cpp tree's gguf-py writes the file): build first.")
    sys.path.insert(0, str(tree))
    import gguf  # type: ignore[import-not-found]

    return gguf


def write_tensors_and_close(writer: Any, tensors: dict) -> None:
    """Add ``tensors`` (name -> array) to a GGUFWriter whose metadata is set, write the file, close it."""
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
