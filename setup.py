"""Build the optional Cython accelerators in `_fast/`.

The extensions are optional: when Cython or a compiler is missing the package still installs
and the agent falls back to their pure-Python twins (see `agent/accel.py`).
"""

import os

from setuptools import setup

ext_modules = []
if os.environ.get("NETAGENT_NO_EXT") != "1":
    try:
        from Cython.Build import cythonize

        ext_modules = cythonize(
            ["_fast/*.pyx"],
            compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
            quiet=True,
        )
    except ImportError:  # pragma: no cover - build without Cython
        ext_modules = []

setup(ext_modules=ext_modules)
