"""Packaging hook: compile llama.cpp with build_llama.py and bundle the libraries.

Set ``MULLAMA_BUILD_OPTIONS`` to pass options to the build, for example
``MULLAMA_BUILD_OPTIONS=--portable pip wheel .`` for a redistributable wheel.
The wheel is tagged ``py3-none-<platform>``: it holds no Python extension (cffi's
ABI mode needs none), only shared libraries for one platform.
"""

import os
import shlex
import shutil
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_llama


def _build_libraries() -> build_llama.BuildResult:
    args = build_llama.make_parser().parse_args(shlex.split(os.environ.get("MULLAMA_BUILD_OPTIONS", "")))
    return build_llama.build(build_llama.options_from_args(args), source=args.source, jobs=args.jobs)


class BuildPyWithLlama(build_py):
    """build_py, plus libllama and ggml copied into mullama/lib (not for editable installs,
    which load the libraries from the per-user build cache)."""

    def run(self):
        super().run()
        result = _build_libraries()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "mullama" / "lib"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for library in result.core_libraries():
            shutil.copy2(library, target / library.name)
        shutil.copy2(result.root / build_llama.MANIFEST_NAME, target / build_llama.MANIFEST_NAME)


class BinaryDistribution(Distribution):
    """Holds platform libraries: installed to platlib, wheel not pure."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    """A wheel named for its platform, and for its accelerator when it has one
    (``mullama-0.1.0+cuda-py3-none-linux_x86_64.whl``)."""

    def finalize_options(self):
        args = build_llama.make_parser().parse_args(shlex.split(os.environ.get("MULLAMA_BUILD_OPTIONS", "")))
        backend = build_llama.backend_name(build_llama.options_from_args(args))
        if backend != "cpu" and "+" not in self.distribution.metadata.version:
            self.distribution.metadata.version += f"+{backend}"
        super().finalize_options()

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(distclass=BinaryDistribution, cmdclass={"build_py": BuildPyWithLlama, "bdist_wheel": PlatformWheel})
