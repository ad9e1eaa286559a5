"""Run `resnetlab ARGV...` and SIGKILL the process itself at a chosen moment, for the kill -9 tests.

    python _killable.py MOMENT N ARGV...

MOMENT picks where the N-th event kills the process (no handler runs, nothing is flushed):
  backward            inside the N-th training step, after the forward pass, before the update
  rename:NAME         the N-th atomic write of checkpoints/NAME: its temp file is complete and
                      fsynced but not yet renamed over NAME
  halfwrite:NAME      the N-th write of NAME: only half of its temp file reached the disk
  none                never (a kill from outside, at a time the test chooses)
"""
from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(moment: str, n: int) -> None:
    count = 0

    def reached() -> bool:
        nonlocal count
        count += 1
        return count == n

    kind, _, name = moment.partition(":")
    if kind == "backward":
        import torch

        real_backward = torch.Tensor.backward

        def backward(self, *args, **kwargs):
            if reached():
                _die()
            return real_backward(self, *args, **kwargs)

        torch.Tensor.backward = backward
    elif kind == "rename":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if os.path.basename(dst) == name and reached():
                _die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif kind == "halfwrite":
        real_fsync = os.fsync

        def fsync(fd):
            target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
            if os.path.basename(target).startswith(f".{name}.") and reached():
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                _die()
            return real_fsync(fd)

        os.fsync = fsync
    elif kind != "none":
        raise SystemExit(f"unknown moment {moment!r}")


if __name__ == "__main__":
    _install(sys.argv[1], int(sys.argv[2]))
    from resnetlab.cli import main

    raise SystemExit(main(sys.argv[3:]))
