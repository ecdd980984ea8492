"""Tests that exercise the fused CPU kernels skip (never fail) only where they cannot be built at all."""

from __future__ import annotations

import os
import shutil

import pytest


def require_compiler() -> None:
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        pytest.skip(
            "no C++ compiler: the fused CPU kernels cannot be built here (the torch fallback is tested)"
        )
