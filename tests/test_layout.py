"""`core` must stay importable without Ray (the GPU benchmark machine and every role rely on it)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import core

REPO = Path(__file__).resolve().parent.parent


def test_core_imports_no_ray():
    modules = [m.name for m in pkgutil.walk_packages(core.__path__, "core.")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'deepspeed'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert "core.wan.model" in modules and "core.rollout" in modules
