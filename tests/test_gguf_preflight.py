"""GGUF pre-flight: a file on which llama.cpp would abort the process is refused with MODEL_LOAD_ERROR
naming the key, in this very process (crafted from the real model file by tests/crafted_gguf.py);
real models still load; the header reader is iterative and bounded; seeded byte mutations of the
real model's header never kill a process (each loaded in a subprocess, so that an abort is seen)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
from crafted_gguf import (
    INT32,
    craft,
    f32,
    header,
    nested_arrays,
    numbers,
    read_strings,
    string,
    strings,
    u32,
)

import mullama
from mullama import ModelLoadError
from mullama.gguf import _preflight, _reader
from mullama.hub import _pull
from mullama.native import _library

TOKENS = "tokenizer.ggml.tokens"


@pytest.fixture(scope="module")
def tokens(model_path) -> list[bytes]:
    return read_strings(model_path, TOKENS)


@pytest.fixture()
def crafted(tmp_path, model_path):
    """craft(...) into tmp_path; the ~100 MB files are deleted after each test."""
    made: list[Path] = []

    def make(changes=None, **options) -> Path:
        path = craft(model_path, tmp_path / f"crafted-{len(made)}.gguf", changes, **options)
        made.append(path)
        return path

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def replaced(tokens: list[bytes], **at: bytes) -> dict:
    """The token list with tokens replaced (``i1000=b"..."``), as a change for craft()."""
    new = list(tokens)
    for index, value in at.items():
        new[int(index[1:])] = value
    return {TOKENS: strings(new)}


# name -> (the craft() arguments, given the real vocabulary; what the error must say)
CASES = {
    "no layers": (lambda t: {"changes": {"llama.block_count": u32(0)}}, "llama.block_count is 0"),
    "513 layers": (lambda t: {"changes": {"llama.block_count": u32(513)}}, "llama.block_count is 513"),
    "2**31 layers": (lambda t: {"changes": {"llama.block_count": u32(2**31)}}, "llama.block_count is 2147483648"),
    "NaN epsilon": (lambda t: {"changes": {"llama.attention.layer_norm_rms_epsilon": f32(math.nan)}},
                    "llama.attention.layer_norm_rms_epsilon is nan"),
    "negative epsilon": (lambda t: {"changes": {"llama.attention.layer_norm_rms_epsilon": f32(-1e-5)}},
                         "llama.attention.layer_norm_rms_epsilon is -"),
    "infinite epsilon": (lambda t: {"changes": {"llama.attention.layer_norm_rms_epsilon": f32(math.inf)}},
                         "llama.attention.layer_norm_rms_epsilon is inf"),
    "unknown rope scaling": (lambda t: {"changes": {"llama.rope.scaling.type": string("bogus")}},
                             "llama.rope.scaling.type is 'bogus'"),
    "2000 experts": (lambda t: {"changes": {"llama.expert_count": u32(2000), "llama.expert_used_count": u32(2)}},
                     "llama.expert_count is 2000"),
    "more experts used than exist": (
        lambda t: {"changes": {"llama.expert_count": u32(4), "llama.expert_used_count": u32(8)}},
        "llama.expert_used_count is 8"),
    "experts, none used": (lambda t: {"changes": {"llama.expert_count": u32(4)}}, "llama.expert_used_count is 0"),
    # 64 x (3 + 2**26) wraps around to 64 x 3 in uint32: the tensor shapes still match at load, and ggml
    # asserts at the first decode (a byte mutation found it: the high byte of head_count_kv).
    "KV heads wrapping around 32 bits": (lambda t: {"changes": {"llama.attention.head_count_kv": u32(3 + 2**26)}},
                                         "llama.attention.head_count_kv is 67108867 for layer 0"),
    # llama.cpp looks keys up with strcmp: a key with a NUL inside, placed first, is the one it reads.
    "a key shadowed through a NUL": (lambda t: {"first": {"llama.block_count\0x": u32(0)}}, "llama.block_count is 0"),
    "a key twice": (lambda t: {"first": {"llama.block_count": u32(30)}}, "'llama.block_count' appears twice"),
    "fewer token types than tokens": (
        lambda t: {"changes": {"tokenizer.ggml.token_type": numbers(INT32, "i", [1] * 100)}},
        "tokenizer.ggml.token_type has 100 entries for 49152 tokens"),
    "a token twice": (lambda t: {"changes": replaced(t, i1000=t[1001])}, f"{TOKENS} holds the token 'Ġloc' twice"),
    # llama.cpp keys tokens as C strings: cut at a NUL, they collide.
    "a token twice up to a NUL": (lambda t: {"changes": replaced(t, i1000=t[1001] + b"\0junk")},
                                  f"{TOKENS} holds the token 'Ġloc' twice (ids 1000 and 1001)"),
    # ... and an empty token becomes "[EMPTY_<id>]".
    "an empty token named like another": (lambda t: {"changes": replaced(t, i5=b"", i6=b"[EMPTY_5]")},
                                          f"{TOKENS} holds the token '[EMPTY_5]' twice (ids 5 and 6)"),
    "tensor data past the end": (lambda t: {"cut": 4096}, "lies beyond the end of the file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_crafted_file_is_refused_naming_the_key(case, crafted, tokens):
    make, expected = CASES[case]
    path = crafted(**make(tokens))
    with pytest.raises(ModelLoadError) as info:
        mullama.Model.load(path)
    assert info.value.code == "MODEL_LOAD_ERROR"
    assert expected in str(info.value), str(info.value)
    assert str(path) in str(info.value) and "download it again" in str(info.value).lower()


RAW_LOAD = """
import os, sys
from mullama.native import _library
library = _library.get()
ffi, lib = library.ffi, library.lib
model = lib.llama_model_load_from_file(os.fsencode(sys.argv[1]), lib.llama_model_default_params())
assert model != ffi.NULL
params = lib.llama_context_default_params()
params.n_ctx = params.n_batch = 64
context = lib.llama_init_from_model(model, params)
tokens = ffi.new("llama_token[]", [1, 2, 3])
print("decoded", lib.llama_decode(context, lib.llama_batch_get_one(tokens, 3)))
"""


@pytest.mark.parametrize("case", ["no layers", "NaN epsilon", "a token twice up to a NUL",
                                  "a key shadowed through a NUL", "KV heads wrapping around 32 bits"])
def test_without_the_preflight_llama_cpp_aborts_on_them(case, crafted, tokens):
    """The cases above are real: llama.cpp itself, handed the file directly, kills the process. It ends at
    once: with ggml's backtrace (a debugger forked from a process with threads) "NaN epsilon" hung on a
    busy machine, so the library turns it off (GGML_NO_BACKTRACE); the timeout only guards the suite."""
    make, _ = CASES[case]
    path = crafted(**make(tokens))
    result = subprocess.run([sys.executable, "-c", RAW_LOAD, str(path)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode < 0 or result.returncode == 134, (result.returncode, result.stdout)
    assert "GGML_ASSERT" in result.stderr or "ggml_abort" in result.stderr.lower() or "terminate" in result.stderr


def test_ggml_backtraces_are_off_unless_asked_for():
    """Loading the library sets GGML_NO_BACKTRACE (an abort then ends the process, never hangs in a forked
    debugger), leaves a value the user set, and sets nothing with MULLAMA_GGML_BACKTRACE."""
    show = "import os; from mullama.native import _library; _library.get(); print(os.environ.get('GGML_NO_BACKTRACE'))"
    names = ("GGML_NO_BACKTRACE", "MULLAMA_GGML_BACKTRACE")
    base = {key: value for key, value in os.environ.items() if key not in names}
    cases = (({}, "1"), ({"GGML_NO_BACKTRACE": "yes"}, "yes"), ({"MULLAMA_GGML_BACKTRACE": "1"}, "None"))
    for extra, expected in cases:
        result = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, timeout=120,
                                env={**base, **extra}, check=True)
        assert result.stdout.strip() == expected, (extra, result.stdout, result.stderr)


def test_what_llama_cpp_accepts_still_loads(crafted, tokens):
    """Mirrored precisely: an empty token, a token with a NUL that collides with nothing, and a layer
    count llama.cpp never reads (vocab_only) are accepted, as llama.cpp accepts them."""
    path = crafted(replaced(tokens, i5=b"", i7=tokens[7] + b"\0zz"))
    with mullama.Model.load(path) as model, mullama.Context(model, n_ctx=256) as context:
        assert context.generate("Hello", max_tokens=2).token_ids
    path = crafted({"llama.block_count": u32(0)})
    with mullama.Model.load(path, vocab_only=True) as model:
        assert model.tokenize("Hello, world", add_special=False)


def test_an_unchanged_rewrite_loads_and_generates_like_the_original(crafted, model):
    path = crafted()
    assert header(path).values == header(model.path).values
    prompt = "The capital of France is"
    with mullama.Context(model, n_ctx=256) as context:
        expected = context.generate(prompt, max_tokens=12).token_ids
    with mullama.Model.load(path) as copy, mullama.Context(copy, n_ctx=256) as context:
        assert context.generate(prompt, max_tokens=12).token_ids == expected


# --- the reader: iterative and bounded -------------------------------------------------------
def test_show_on_arrays_nested_20000_deep(crafted):
    path = crafted({"general.nested": nested_arrays(20_000)})
    with pytest.raises(ModelLoadError) as info:
        _reader.read_gguf_info(path)
    assert "general.nested has arrays nested more than" in str(info.value)
    result = subprocess.run([sys.executable, "-m", "mullama", "show", str(path)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 1 and "MODEL_LOAD_ERROR" in result.stderr
    assert "RecursionError" not in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(ModelLoadError):
        mullama.Model.load(path)
    shallow = crafted({"general.nested": nested_arrays(3)})  # within bounds: shown, counted
    assert _reader.read_gguf_info(shallow).metadata["general.nested"] == "<1 items>"


def tiny_gguf(path: Path, body: bytes, n_tensors: int = 0, n_kv: int = 1) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body)
    return path


@pytest.mark.parametrize("what, body, n_tensors, n_kv, expected", [
    ("2**60 pairs", b"", 0, 2**60, "more than the file can hold"),
    ("2**40 tensors", b"", 2**40, 0, "more than the file can hold"),
    ("a key of 2**50 bytes", struct.pack("<Q", 2**50) + b"\0" * 16, 0, 1,
     "a GGUF header string of 1125899906842624 bytes"),
    ("an array of 2**40 floats", struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 6, 2**40), 0, 1,
     "k claims 1099511627776 items"),
    ("an array of 2**20 strings in 40 bytes", struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2**20)
     + b"\0" * 40, 0, 1, "k claims 1048576 items"),
    ("an unknown value type", struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99), 0, 1,
     "unknown GGUF value type 99"),
    ("a tensor of 9 dimensions", struct.pack("<Q", 1) + b"t" + struct.pack("<I", 9) + b"\0" * 100, 1, 0,
     "has 9 dimensions"),
])
def test_absurd_counts_are_refused_before_anything_is_allocated(tmp_path, what, body, n_tensors, n_kv, expected):
    path = tiny_gguf(tmp_path / "absurd.gguf", body, n_tensors, n_kv)
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError) as info:
            _reader.read_gguf_info(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert expected in str(info.value), (what, str(info.value))
    assert peak < 16 << 20, what
    with pytest.raises(ModelLoadError):
        mullama.Model.load(path)


def test_a_header_beyond_the_limit_is_refused(model_path, monkeypatch):
    monkeypatch.setattr(_reader, "MAX_HEADER", 1 << 20)  # the real model's header is ~1.8 MB
    with pytest.raises(ModelLoadError) as info:
        _reader.read_gguf_info(model_path)
    assert "a GGUF header larger than 1 MiB" in str(info.value)


def test_read_gguf_info_reads_what_it_did(model_path):
    info = _reader.read_gguf_info(model_path)
    assert (info.version, info.n_tensors, info.n_params) == (3, 272, 134_515_008)
    assert info.metadata["general.languages"] == ["en"] and info.metadata[TOKENS] == "<49152 items>"
    assert info.metadata["llama.block_count"] == 30 and info.chat_template.startswith("{% for message")


@pytest.mark.parametrize(("name", "vocabulary"), [("smollm2:135m", 49_152), ("gemma3:270m", 262_144)])
def test_real_models_pass_the_preflight_quickly(name, vocabulary, tmp_path, monkeypatch):
    """Both real vocabularies (49,152 and 262,144 tokens) pass the full check; once a vocabulary is known
    to be unique (a marker in the cache, by content digest) the pre-flight reads metadata only."""
    path = _pull.resolve(name)
    _library.get()
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path))  # no marker yet: the full uniqueness check runs
    monkeypatch.setattr(_preflight, "_unique_vocabularies", set())
    _reader._skip_pattern()  # compiled once per process
    _preflight._split_patterns()
    token_texts = _preflight._token_texts
    read = []  # the vocabularies whose every token text the check read
    monkeypatch.setattr(_preflight, "_token_texts", lambda data, tokens: read.append(tokens.count)
                        or token_texts(data, tokens))
    started = time.perf_counter()
    _preflight.preflight(path)
    first = time.perf_counter() - started
    assert read == [vocabulary]
    assert len(list((tmp_path / "checked").iterdir())) == 1
    monkeypatch.setattr(_preflight, "_unique_vocabularies", set())  # a new process: only the marker is left
    times = []
    for _ in range(5):
        started = time.perf_counter()
        _preflight.preflight(path)
        times.append(time.perf_counter() - started)
    assert len(read) == 1  # the marker stood for the check: the token texts were not read again
    # (about 15 and 40 ms on a quiet 2-core machine: printed, not asserted)
    print(f"\n{name}: pre-flight {first * 1e3:.0f} ms the first time, then {min(times) * 1e3:.0f} ms")


# --- seeded byte mutations, each loaded in a subprocess -------------------------------------------------
MUTATE = r"""
import json, sys
import mullama
path, plan = sys.argv[1], json.loads(sys.argv[2])
for index, offset, xor in plan:
    with open(path, "r+b") as f:
        f.seek(offset); original = f.read(1)[0]; f.seek(offset); f.write(bytes([original ^ xor]))
    print(f"start {index} {original}", flush=True)
    try:
        with mullama.Model.load(path) as model:
            model.tokenize("Hello, world"); model.metadata
            with mullama.Context(model, n_ctx=256, n_batch=64) as context:
                context.generate("Hi", max_tokens=2)
        outcome = "loaded and generated"
    except mullama.MullamaError as error:
        outcome = error.code
    except Exception as error:  # not a MullamaError: a bug too
        outcome = f"{type(error).__name__}: {error}"[:200]
    with open(path, "r+b") as f:
        f.seek(offset); f.write(bytes([original]))
    print(f"done {index} {outcome}", flush=True)
"""


def mutation_plan(path: Path, count: int, seed: int) -> list[list[int]]:
    """``count`` single-byte changes (offset, xor): a third each in the key/value pairs before the
    vocabulary (the hyper-parameters), in the vocabulary, and in the rest of the header (token types,
    merges, chat template, tensor descriptions)."""
    parsed = header(path)
    vocabulary = parsed.arrays[TOKENS]
    regions = [(0, vocabulary.start), (vocabulary.start, vocabulary.end), (vocabulary.end, parsed.tensors_span[1])]
    rng = random.Random(seed)
    return [[i, rng.randrange(*regions[i % 3]), rng.randrange(1, 256)] for i in range(count)]


def run_mutations(path: Path, plan: list[list[int]]) -> dict[int, str]:
    """Outcome per mutation; a child killed by a signal is noted (and its byte restored), and the rest of
    the plan goes on in a new child."""
    outcomes: dict[int, str] = {}
    remaining = plan
    while remaining:
        try:
            result = subprocess.run([sys.executable, "-c", MUTATE, str(path), json.dumps(remaining)],
                                    capture_output=True, text=True, timeout=60 + 10 * len(remaining), check=False)
            output, code = result.stdout, result.returncode
        except subprocess.TimeoutExpired as exc:
            output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            code, result = None, None
        started = None
        for line in output.splitlines():
            if not line.startswith(("start ", "done ")):
                continue  # (llama.cpp's abort handler prints a backtrace to stdout)
            word, index, rest = line.split(" ", 2)
            if word == "start":
                started = (int(index), int(rest))
            else:
                outcomes[int(index)], started = rest, None
        if started is None:
            assert code == 0, (code, result.stderr[-3000:] if result else "")
            break
        index, original = started
        offset = next(item[1] for item in remaining if item[0] == index)
        with open(path, "r+b") as handle:
            handle.seek(offset)
            handle.write(bytes([original]))
        outcomes[index] = "hung" if code is None else f"killed (exit code {code})"
        remaining = [item for item in remaining if item[0] > index]
    return outcomes


def test_byte_mutations_of_the_header_never_kill_the_process(model_path, tmp_path):
    # Seed 4: among its first 120 mutations, one kills a process that hands the file to llama.cpp directly
    # (the high byte of head_count_kv); seeds 3 and 6 flip block_count bytes. 300 mutations of each of
    # seeds 1-6 were run while writing this: 0 killed mullama's process (4 killed llama.cpp's).
    count = int(os.environ.get("MULLAMA_GGUF_MUTATIONS", "120"))
    seed = int(os.environ.get("MULLAMA_GGUF_MUTATION_SEED", "4"))
    path = tmp_path / "mutated.gguf"
    shutil.copyfile(model_path, path)
    try:
        plan = mutation_plan(path, count, seed)
        outcomes = run_mutations(path, plan)
    finally:
        path.unlink(missing_ok=True)
    counts = Counter(outcomes.values())
    print(f"\n{count} mutations (seed {seed}): {dict(counts)}")
    bad = {plan[i][1]: outcome for i, outcome in outcomes.items()
           if outcome not in ("loaded and generated", "MODEL_LOAD_ERROR")}
    assert not bad, bad
    assert len(outcomes) == count
