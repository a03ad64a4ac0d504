"""What the parsed command line means: the model it names, the sampling and context options, where
the model is placed; checked before any model is loaded."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Literal

from .._exceptions import InvalidConfigError, ModelNotFoundError
from ._errors import SAMPLING_FLAGS, checked_config, not_generative

_HF_NAME = re.compile(r"^hf:[\w.\-]+/[\w.@\-]+(:[\w./\-]+)?$")
_TAGGED_NAME = re.compile(r"^[A-Za-z][\w.\-]*:[\w.\-]+$")  # name:tag, as ollama's


def _is_model(word: str, command: str) -> bool:
    """Whether the first word names the model: ``model.gguf``, ``hf:owner/repo``, a known name or family
    (``smollm2:135m``, ``smollm2``). A word that only looks like a model name (``name:tag``, or within a
    typo of a known name: ``smollm``, ``qwen3``) is MODEL_NOT_FOUND, naming the close ones, rather than
    the first word of a prompt; an ordinary word (``hello``, ``Why``) is the prompt."""
    from ..hub._catalog import close_names, entry_for

    if word.endswith(".gguf") or _HF_NAME.match(word):
        return True
    if not (_TAGGED_NAME.match(word) or close_names(word)):
        return False
    try:
        entry_for(word)
    except ModelNotFoundError as error:
        raise ModelNotFoundError(f"{error} If {word!r} is the start of the prompt, write `mullama {command} -- "
                                 f"{word} ...`.") from None
    return True


def model_and_words(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The model (``-m``, else a first word that names one, else the default) and the other words.
    Words after ``--`` are never the model."""
    from ..hub._catalog import DEFAULT_MODEL

    words = list(args.words)
    model_name = args.model
    if model_name is None and words and args.words_before_dashes and _is_model(words[0], args.command):
        model_name = words.pop(0)
    return model_name or DEFAULT_MODEL, words


def model_arg(args: argparse.Namespace) -> str | None:
    """The model the command line names (``-m``, or the first word of ``chat`` and ``bench``), if any."""
    word = getattr(args, "model_word", None)
    if word and args.model and word != args.model:
        raise InvalidConfigError(f"two models: {word} and -m {args.model}; give one.")
    return args.model or word


def model_label(model_ref: str) -> str:
    """A model's name for messages and ``--json``: a known name in full (``smollm2`` is ``smollm2:135m``),
    a path or a Hugging Face name as given."""
    from ..hub._catalog import entry_for, is_local_path

    if is_local_path(model_ref) or model_ref.startswith("hf:"):
        return model_ref
    return entry_for(model_ref).name


def stream_config(args: argparse.Namespace, *, stop: list[str] | None = None) -> Any:
    """The StreamConfig the sampling flags ask for (unset flags keep StreamConfig's defaults); a value it
    refuses names the flag."""
    chosen = {name: getattr(args, name) for name in ("temperature", "seed", "top_k", "top_p", "min_p",
                                                      "repeat_penalty") if getattr(args, name, None) is not None}
    return checked_config(SAMPLING_FLAGS, max_tokens=args.max_tokens, stop_sequences=stop or [], timeout_ms=None,
                          **chosen, **(speculative_options(args) or {}))


def speculative_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The StreamConfig fields --spec-type and the n-gram sizes ask for (None: no speculation), checked."""
    from ..generate._config import StreamConfig

    kind = getattr(args, "spec_type", "none")
    if getattr(args, "model_draft", None):
        if kind in ("ngram", "ngram-simple"):
            raise InvalidConfigError("-md/--model-draft drafts with a model: give --spec-type draft-simple (or none).")
        kind = "draft-simple"
    elif kind == "draft-simple":
        raise InvalidConfigError("--spec-type draft-simple needs a draft model: -md FNAME.")
    if kind == "none":
        for flag, value in (("--spec-ngram-simple-size-n", getattr(args, "draft_min", None)),
                            ("--spec-ngram-simple-size-m", getattr(args, "draft_max", None))):
            if value is not None:
                raise InvalidConfigError(f"{flag} needs --spec-type ngram or ngram-simple.")
        return None
    options: dict[str, Any] = {"speculative": "draft" if kind == "draft-simple" else kind}
    if args.draft_min is not None:
        options["draft_min"] = args.draft_min
    elif kind == "draft-simple":
        options["draft_min"] = 1  # the n-gram size: no use to a draft model
    if args.draft_max is not None:
        options["draft_max"] = args.draft_max
    try:
        StreamConfig(**options)
    except InvalidConfigError as exc:
        raise InvalidConfigError(f"{exc} (--spec-ngram-simple-size-n is draft_min, --spec-ngram-simple-size-m "
                                 "draft_max)") from None
    return options


def flash_attn_option(args: argparse.Namespace) -> bool | None:
    """Context's ``flash_attn`` from -fa/--flash-attn on|off|auto (None: upstream's auto)."""
    return {"on": True, "off": False, "auto": None}[getattr(args, "flash_attn", "auto")]


def check_ctx_size(value: int | None) -> None:
    """-c/--ctx-size: the rule and message of Context(n_ctx=...), checked before any model is loaded."""
    from ..generate._context_params import check_n_ctx

    check_n_ctx(value, "--ctx-size")


def check_generates(model: Any, label: str) -> None:
    """``run``, ``chat`` and ``bench`` need a model that generates text, not an embedding model."""
    if not model.generative:
        raise not_generative(label, model.pooling)


def warn_ctx_size(value: int | None, model: Any) -> None:
    if value is not None and value > model.n_ctx_train:
        print(f"mullama: warning: --ctx-size {value} is beyond the {model.n_ctx_train} tokens this model was trained "
              "with; replies may degrade past that point.", file=sys.stderr)


def placement(args: argparse.Namespace) -> dict[str, Any]:
    """Model.load's offloading options from the command line's flags."""
    try:
        split = [float(part) for part in args.tensor_split.split(",")] if args.tensor_split else None
    except ValueError:
        raise InvalidConfigError(f"--tensor-split must be numbers separated by commas, not {args.tensor_split!r}."
                                 ) from None
    servers = [part.strip() for part in args.rpc.split(",") if part.strip()] if args.rpc else None
    return {"n_gpu_layers": args.n_gpu_layers, "main_gpu": args.main_gpu, "split_mode": args.split_mode,
            "tensor_split": split, "rpc_servers": servers}


def mmproj_option(args: argparse.Namespace) -> str | Literal[False] | None:
    """Model.load's ``mmproj`` from --mmproj FILE and --no-mmproj (None: the projector pulled with the model)."""
    mmproj, off = getattr(args, "mmproj", None), getattr(args, "no_mmproj", False)
    if mmproj and off:
        raise InvalidConfigError("give --mmproj FILE or --no-mmproj, not both.")
    return False if off else mmproj


def check_writable(path: str, flag: str) -> None:
    """Refuse at once a file that could not be written later (a missing directory, no permission)."""
    target = Path(path).expanduser()
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as exc:
        raise InvalidConfigError(f"cannot write {flag} {path}: {exc.strerror or exc}; give a file in a "
                                 "directory that exists and is writable.") from None
    if not existed:
        target.unlink(missing_ok=True)
