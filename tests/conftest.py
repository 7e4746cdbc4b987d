"""Test-environment setup.

torchvision 0.28.0 on PyPI is a CUDA build; beside the CPU build of torch 2.13.0 that this
project pins, ``import torchvision`` fails with "operator torchvision::nms does not exist"
because its C++ extension (which registers that operator schema) cannot load. torchvision's
Python code only needs the *schemas* of ``torchvision::nms`` and ``torchvision::qnms`` to
exist, so we define them here before anything imports torchvision. This is a workaround for
this test machine only: expandfx itself never imports torchvision, and nothing here runs the
(unavailable) kernels — the model-zoo tests build and run plain conv/linear networks.
"""

from __future__ import annotations

import os

import pytest
import torch

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _define_torchvision_schemas() -> None:
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return  # a working torchvision extension already registered them
    except RuntimeError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms" + _SCHEMA)
    lib.define("qnms" + _SCHEMA)
    globals()["_TORCHVISION_LIB"] = lib  # the schemas live as long as the library object


_define_torchvision_schemas()


def pytest_configure(config):
    from hypothesis import settings

    # CI: the same examples every run (no flaky surprises); `fuzz` explores fresh ones
    settings.register_profile("ci", deadline=None, derandomize=True)
    # `HYPOTHESIS_PROFILE=fuzz make test` (see README): many more random cases
    settings.register_profile("fuzz", deadline=None, max_examples=2000)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def one_thread():
    """One torch thread for the duration of a test: two threads on the shared 2-core
    machine thrash, and fold's checks are small."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_sessionfinish(session, exitstatus):
    """After a fuzz run, record how many random cases ran (all passed, or pytest failed)."""
    import time
    from pathlib import Path

    from support import COUNTS, FUZZ

    if not FUZZ or not COUNTS:
        return
    failed = session.testsfailed
    lines = [f"- {case}: {n} random cases passed" for case, n in COUNTS.items()]
    Path(__file__).parents[1].joinpath("benchmarks/results/fuzz.md").write_text(
        "# Fuzz run\n\n`HYPOTHESIS_PROFILE=fuzz .venv/bin/python -m pytest "
        "tests/test_fuzz_networks.py tests/test_roundtrip_property.py tests/test_collapsed.py`"
        f"\n\nRun {time.strftime('%Y-%m-%d')}; failed tests: {failed}.\n\n"
        + "\n".join(lines) + "\n")
