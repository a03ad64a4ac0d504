"""The generated cffi bindings match the pinned llama.h (and libmtmd's mtmd.h, mtmd-helper.h), the built
libraries and the C compiler."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cffi
import pytest
from cffi import cparser

import build_llama
import llama_source
from mullama.native import _library

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import gen_bindings

IMPORTANT = [
    "llama_backend_init", "llama_model_load_from_file", "llama_model_free", "llama_init_from_model",
    "llama_free", "llama_tokenize", "llama_token_to_piece", "llama_detokenize", "llama_decode",
    "llama_batch_get_one", "llama_get_memory", "llama_memory_seq_rm", "llama_memory_clear",
    "llama_sampler_chain_init", "llama_sampler_sample", "llama_sampler_init_greedy",
    "llama_sampler_init_dist", "llama_model_chat_template", "llama_set_abort_callback", "llama_log_set",
    "llama_vocab_is_eog", "llama_print_system_info",
]


@pytest.fixture(scope="module")
def source_tree(build):
    return build_llama.ensure_source()


MTMD_IMPORTANT = [
    "mtmd_init_from_file", "mtmd_free", "mtmd_context_params_default", "mtmd_tokenize", "mtmd_encode_chunk",
    "mtmd_get_output_embd", "mtmd_input_chunks_init", "mtmd_input_chunks_free", "mtmd_input_chunk_get_type",
    "mtmd_decode_use_non_causal", "mtmd_decode_use_mrope", "mtmd_support_vision", "mtmd_support_audio",
    "mtmd_helper_bitmap_init_from_buf", "mtmd_helper_eval_chunk_single", "mtmd_helper_decode_image_chunk",
    "mtmd_bitmap_free", "mtmd_helper_log_set",
]


def _declared(*cdefs: str) -> set[str]:
    parser = cparser.Parser()
    parser.parse("".join((REPO / "bindings" / name).read_text() for name in cdefs))
    return {key.split(" ", 1)[1] for key in parser._declarations if key.startswith("function ")}


@pytest.fixture(scope="module")
def declared_functions():
    return _declared("llama_cdef.h")


@pytest.fixture(scope="module")
def declared_mtmd_functions():
    return _declared("llama_cdef.h", "mtmd_cdef.h") - _declared("llama_cdef.h")


def test_regenerating_gives_identical_files(source_tree):
    generated = gen_bindings.render(source_tree)
    for name, text in generated.items():
        committed = (REPO / "bindings" / name).read_text()
        assert committed == text, f"bindings/{name} drifted from llama.h; run python tools/gen_bindings.py"


@pytest.mark.parametrize("header, field, edited_field", [
    ("include/llama.h", "uint32_t n_batch;", "uint32_t n_new_field;"),
    ("tools/mtmd/mtmd.h", "bool add_special;", "int n_new_mtmd_field;"),
])
def test_an_edited_header_is_caught(source_tree, tmp_path, header, field, edited_field):
    for sub in ("include", "ggml/include", "tools/mtmd"):
        shutil.copytree(source_tree / sub, tmp_path / sub)
    path = tmp_path / header
    text = path.read_text()
    edited = text.replace(field, f"{field}\n    {edited_field}", 1)
    assert edited != text
    path.write_text(edited)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "gen_bindings.py"), "--check",
                             "--source", str(tmp_path)], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert edited_field.split()[-1].rstrip(";") in result.stdout
    assert "drifted" in result.stderr


def test_the_mtmd_bindings_hold_only_the_mtmd_headers_declarations():
    cdef = (REPO / "bindings" / "mtmd_cdef.h").read_text()
    assert "llama_decode" not in cdef and "ggml_init" not in cdef
    assert "struct mtmd_context_params {" in cdef


def test_bindings_record_the_pin(source_tree):
    _ffi, LLAMA_CPP_COMMIT, LLAMA_H_SHA256 = _library._bindings()
    assert LLAMA_CPP_COMMIT == build_llama.LLAMA_CPP_COMMIT
    assert LLAMA_H_SHA256 == llama_source.LLAMA_H_SHA256
    from mullama._bindings import MTMD_H_SHA256

    assert MTMD_H_SHA256 == gen_bindings.mtmd_headers_sha256(source_tree)


def test_libmtmd_is_opened_once_beside_libllama():
    mtmd = _library.get_mtmd()
    assert _library.get_mtmd() is mtmd
    assert mtmd.path.parent == _library.get().path.parent
    # Struct pointers of the llama bindings are the same types in the mtmd bindings.
    assert mtmd.ffi.typeof("struct llama_model *") is _library.get().ffi.typeof("struct llama_model *")
    assert mtmd.ffi.string(mtmd.lib.mtmd_default_marker()) == b"<__media__>"


def test_structs_passed_by_value_cross_the_boundary():
    """mtmd_context_params and mtmd_helper_init_opt go in by value, mtmd_caps and
    mtmd_helper_bitmap_wrapper come out by value (cffi's ABI mode, as llama.h's params)."""
    mtmd = _library.get_mtmd()
    params = mtmd.lib.mtmd_context_params_default()
    assert params.n_threads > 0 and mtmd.ffi.string(params.media_marker) == b"<__media__>"
    caps = mtmd.lib.mtmd_get_cap_from_file(b"/nonexistent.gguf")
    assert not caps.inp_vision and not caps.inp_audio
    options = mtmd.lib.mtmd_helper_init_opt_default()
    assert options.video_params.fps_target > 0


def _exported_symbols(path: Path, prefix: str = "") -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], check=True, capture_output=True,
                         text=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    return {name for name in names if name.startswith(prefix)}


def test_every_declared_llama_function_is_exported_and_vice_versa(declared_functions):
    exported = _exported_symbols(_library.get().path, "llama_")
    declared = {name for name in declared_functions if name.startswith("llama_")}
    assert len(declared) > 200
    assert declared - exported == set(), "declared in the cdef but missing from libllama"
    assert exported - declared == set(), "exported by libllama but not declared"
    assert set(IMPORTANT) <= declared


def test_every_declared_mtmd_function_is_exported_and_vice_versa(declared_mtmd_functions):
    """libmtmd's C API (its C++ symbols and the bundled stb/miniaudio helpers aside) is declared exactly."""
    exported = _exported_symbols(_library.get_mtmd().path, "mtmd_")
    assert len(declared_mtmd_functions) > 50
    assert declared_mtmd_functions - exported == set(), "declared in mtmd_cdef.h but missing from libmtmd"
    assert exported - declared_mtmd_functions == set(), "exported by libmtmd but not declared"
    assert set(MTMD_IMPORTANT) <= declared_mtmd_functions
    mtmd = _library.get_mtmd()
    for name in sorted(declared_mtmd_functions):
        getattr(mtmd.lib, name)


def test_every_declared_function_resolves(declared_functions):
    """ggml functions come from libllama's dependencies; each must resolve through the loaded lib,
    except any that upstream declares in a header but defines in no library."""
    library = _library.get()
    defined = set().union(*(_exported_symbols(p) for p in library.path.parent.glob("lib*.so*")))
    undefined_upstream = declared_functions - defined
    assert len(undefined_upstream) <= 3, undefined_upstream  # today: ggml_threadpool_get_n_threads
    unresolved = []
    for name in sorted(declared_functions - undefined_upstream):
        try:
            getattr(library.lib, name)
        except (AttributeError, cffi.FFIError, library.ffi.error):
            unresolved.append(name)
    assert unresolved == []


@pytest.mark.parametrize("bindings", ["llama", "mtmd"])
def test_struct_layouts_match_the_c_compiler(source_tree, tmp_path, bindings):
    """ABI mode trusts the cdef blindly, so every size, alignment and offset is checked against gcc."""
    ffi = _library.get().ffi if bindings == "llama" else _library.get_mtmd().ffi
    headers = ["llama.h"] if bindings == "llama" else ["llama.h", "mtmd.h", "mtmd-helper.h"]
    _typedefs, structs, unions = ffi.list_types()
    lines, expected = [], []
    for kind, names in (("struct", structs), ("union", unions)):
        for name in names:
            ctype = f"{kind} {name}"
            try:
                size, align = ffi.sizeof(ctype), ffi.alignof(ctype)
            except ffi.error:
                continue  # opaque: only used through pointers
            lines.append(f'printf("{ctype} %zu %zu\\n", sizeof({ctype}), _Alignof({ctype}));')
            expected.append(f"{ctype} {size} {align}")
            for field_name, field in ffi.typeof(ctype).fields:
                if not field_name or field.bitsize != -1:
                    continue
                lines.append(f'printf("{ctype}.{field_name} %zu\\n", offsetof({ctype}, {field_name}));')
                expected.append(f"{ctype}.{field_name} {field.offset}")
    assert len([e for e in expected if "." not in e.split()[1]]) >= 30
    program = tmp_path / "layout.c"
    includes = "".join(f'#include "{header}"\n' for header in headers)
    program.write_text("#include <stdio.h>\n#include <stddef.h>\n" + includes
                       + "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    binary = tmp_path / "layout"
    subprocess.run(["gcc", "-std=c11", "-I", str(source_tree / "include"), "-I",
                    str(source_tree / "ggml" / "include"), "-I", str(source_tree / "tools" / "mtmd"),
                    str(program), "-o", str(binary)], check=True)
    actual = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.splitlines()
    mismatches = [(e, a) for e, a in zip(expected, actual) if e != a]
    assert mismatches == []
    assert len(actual) == len(expected)
