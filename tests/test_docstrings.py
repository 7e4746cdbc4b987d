"""Every docstring example in the package runs and prints what it claims."""

import doctest
import importlib
import pkgutil

import expandfx.passes
import pytest

import expandfx

MODULES = sorted(
    {m.name for pkg in (expandfx, expandfx.passes)
     for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")} | {"expandfx"}
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"
