"""Every example in pkfast's docstrings runs and prints what it says (doctest, per module)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import pkfast
from pkfast import layers

MODULES = sorted({m.name for m in pkgutil.walk_packages(pkfast.__path__, "pkfast.")}
                 - {"pkfast.__main__", "pkfast.engine.accumulate.triton_kernel"})  # (the kernel needs triton at import)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    before = set(layers.registered())
    try:
        module = importlib.import_module(name)
        failed, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
        assert failed == 0, f"{failed} docstring example(s) of {name} failed (run: python -m doctest -v)"
    finally:
        for t in set(layers.registered()) - before:  # rules an example registered
            layers.unregister(t)
