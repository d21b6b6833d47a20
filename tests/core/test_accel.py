"""The Cython extensions are built wherever they can be: a machine with a C compiler and the
Python headers that runs the suite without them fails here, instead of the twin tests
(Cython vs pure, tests/core/test_*) skipping silently."""

from __future__ import annotations

import importlib
import os
import shutil
import sysconfig

import pytest

from agent import accel

EXTENSIONS = ("bitmap", "serialize", "nlevents", "dnsudp")


def _can_build() -> bool:
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    return bool(shutil.which("cc") or shutil.which("gcc")) and os.path.exists(headers)


@pytest.mark.skipif(not _can_build(), reason="no C compiler or Python headers here")
@pytest.mark.parametrize("name", EXTENSIONS)
def test_extensions_are_built_where_a_compiler_exists(name: str) -> None:
    try:
        importlib.import_module(f"_fast.{name}")
    except ImportError as exc:
        pytest.fail(f"_fast.{name} is not built ({exc}): run scripts/install.sh")


def test_accel_uses_them_unless_told_not_to() -> None:
    if os.environ.get("NETAGENT_PURE") == "1" or not _can_build():
        pytest.skip("pure twins requested, or nothing to build with")
    assert accel.ACCELERATED
