"""Error codes: each class has one code and each code one class (README: "The class always matches the
code"), every code that mullama can raise is in docs/troubleshooting.md's table, and the errors that once
carried another class's code (a LoRA adapter, an image without a projector) are raised as their own class,
still caught as the family they belong to."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import mullama
from mullama import _exceptions

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "mullama"
TABLE_ROW = re.compile(r"^\| `([A-Z_]+)` \|", re.MULTILINE)


def error_classes() -> list[type[mullama.MullamaError]]:
    """MullamaError and every subclass of it that mullama defines (in any of its modules: all imported)."""
    for module in pkgutil.walk_packages(mullama.__path__, "mullama."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found, todo = [], [mullama.MullamaError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [cls for cls in found if cls.__module__ == "mullama" or cls.__module__.startswith("mullama.")]


def constructions() -> list[tuple[str, ast.Call]]:
    """Every call in mullama's source that makes one of its errors (by class name), with its file."""
    names = {cls.__name__ for cls in error_classes()}
    calls = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if name in names:
                    calls.append((f"{path.relative_to(REPO)}:{node.lineno}", node))
    return calls


def raised_codes() -> set[str]:
    """The codes mullama can raise: those of the classes its source makes, and any code= it passes."""
    by_name = {cls.__name__: cls.code for cls in error_classes()}
    codes = set()
    for _, call in constructions():
        codes.add(by_name[call.func.id if isinstance(call.func, ast.Name) else call.func.attr])
        codes.update(keyword.value.value for keyword in call.keywords
                     if keyword.arg == "code" and isinstance(keyword.value, ast.Constant))
    return codes


def defining(cls: type[mullama.MullamaError]) -> type[mullama.MullamaError]:
    """The class that gave ``cls`` its code: itself, or the nearest base that sets ``code``."""
    return next(base for base in cls.__mro__ if "code" in vars(base))


def test_each_code_belongs_to_one_class_and_its_subclasses():
    """One class sets each code; a class that sets none (an internal refinement, such as the engine's
    SlotNotFoundError) has its base's code, so that catching the class of a code catches all of it."""
    classes = error_classes()
    setters = [cls.code for cls in classes if "code" in vars(cls)]
    assert len(setters) == len(set(setters)), sorted(setters)
    for cls in classes:
        assert cls("a message").code == cls.code == defining(cls).code and re.fullmatch(r"[A-Z_]+", cls.code)
        assert issubclass(cls, defining(cls))


def test_no_error_is_made_with_another_code_than_its_class():
    passed = [where for where, call in constructions() if any(keyword.arg == "code" for keyword in call.keywords)]
    assert passed == []
    with pytest.raises(TypeError):
        mullama.MediaError("x", code="MEDIA_TOO_LARGE")  # type: ignore[call-arg]


def test_every_code_has_a_public_class():
    setters = {cls.__name__ for cls in error_classes() if "code" in vars(cls)}
    assert setters <= set(_exceptions.__all__) and setters <= set(mullama.__all__)


def test_troubleshooting_lists_every_code_mullama_raises():
    listed = set(TABLE_ROW.findall((REPO / "docs" / "troubleshooting.md").read_text()))
    defined = {cls.code for cls in error_classes() if cls is not mullama.MullamaError}
    raised = raised_codes()
    assert "MULLAMA_ERROR" not in raised  # the base class is never raised itself: each error has its code
    assert raised <= defined
    assert defined - listed == set()


def test_a_lora_file_that_cannot_be_loaded_is_a_lora_load_error(model, tmp_path):
    with pytest.raises(mullama.LoraLoadError) as missing:
        model.load_lora(tmp_path / "nope.gguf")
    assert isinstance(missing.value, mullama.ModelLoadError) and missing.value.code == "LORA_LOAD_ERROR"
    not_gguf = tmp_path / "adapter.gguf"
    not_gguf.write_bytes(b"not a GGUF file")
    with pytest.raises(mullama.ModelLoadError) as refused:  # caught as the family
        model.load_lora(not_gguf)
    assert type(refused.value) is mullama.LoraLoadError and refused.value.code == "LORA_LOAD_ERROR"


def test_an_image_for_a_model_without_a_projector_is_media_not_supported(context):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    with pytest.raises(mullama.MediaError) as caught:  # and so a ValueError, as before
        context.chat_stream(messages, max_tokens=4)
    assert type(caught.value) is mullama.MediaNotSupportedError
    assert caught.value.code == "MEDIA_NOT_SUPPORTED" and isinstance(caught.value, ValueError)
    assert "mmproj" in str(caught.value)


def test_the_server_tells_how_to_serve_a_projector(served):
    """The library's advice names Model.load; a server's user gets the server's flag instead."""
    import openai

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    assert caught.value.code == "MEDIA_NOT_SUPPORTED" and "--mmproj" in caught.value.message
    assert "Model.load" not in caught.value.message
