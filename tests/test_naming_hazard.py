"""Our top-level `kernels` package must not be mistaken for the Hugging Face kernel hub."""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def test_transformers_does_not_think_the_kernels_hub_is_installed() -> None:
    assert importlib.util.find_spec("kernels") is not None  # ours is importable
    code = (
        "import kernels, transformers.utils.import_utils as iu; "
        "assert kernels.__file__.endswith('kernels/__init__.py'), kernels.__file__; "
        "print(iu.is_kernels_available())"
    )
    # A fresh interpreter: the availability check is cached per process.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
