"""The public API: what `from mullama import ...` offers, as the docs promise it."""

import types

import mullama

SEED_NAMES = {"Model", "Context", "StreamConfig", "AsyncModel", "MullamaError", "StreamingError"}


def test_all_lists_exactly_the_public_names():
    # (the subpackage mullama.server, imported by earlier tests, is a module, not a name of __all__)
    public = {name for name in dir(mullama) if not name.startswith("_") and name != "annotations"
              and not isinstance(getattr(mullama, name), types.ModuleType)}
    assert set(mullama.__all__) == public - {"TYPE_CHECKING", "Any"}
    assert mullama.__all__ == sorted(mullama.__all__)
    assert SEED_NAMES <= set(mullama.__all__)


def test_every_export_resolves_and_errors_have_codes():
    for name in mullama.__all__:
        value = getattr(mullama, name)
        assert value is not None
        if isinstance(value, type) and issubclass(value, mullama.MullamaError):
            assert value.__module__ == "mullama"
            assert value("x").code.isupper()


def test_the_suite_runs_against_the_installed_package():
    """The README's test command installs mullama first: the tests must exercise that copy (with its
    bundled libraries and bindings), not the source tree beside them."""
    assert "site-packages" in mullama.__file__, mullama.__file__
