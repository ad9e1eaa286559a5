"""What a run directory records about the machine and the code: env.json and patch.diff."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[3]  # the checkout holding src/resnetlab, if any


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout


def git_commit() -> str | None:
    """The commit of the resnetlab source tree, or None when it is not a git checkout."""
    if _git("rev-parse", "--show-toplevel") is None:
        return None
    out = _git("rev-parse", "HEAD")
    return out.strip() if out else None


def git_patch() -> str:
    """Uncommitted changes to tracked files (`git diff HEAD`); "" when clean or not a checkout."""
    if git_commit() is None:
        return ""
    return _git("diff", "HEAD", "--no-color", "--no-ext-diff") or ""


def environment(runtime: dict) -> dict:
    import numpy
    import torch

    import resnetlab

    commit = git_commit()
    return {
        "resnetlab": resnetlab.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": _cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "runtime": runtime,
        "git_commit": commit,
        "git_dirty": bool(git_patch()) if commit else None,
        "argv": sys.argv,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
