"""Shared fixtures. Tests that need ../shared data skip with a clear reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR_JPEG = Path(
    os.environ.get("RESNETLAB_SHARED_CIFAR", REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg")
)


@pytest.fixture(autouse=True)
def _small_deterministic_torch():
    # Two cores: keep intra-op threads fixed so timings and results do not depend on the host.
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never write to resnetlab's cache in ~/.cache; the shared JPEG cache is reused across a
    session. (The fused kernel's one-time build goes to torch's extensions cache, as a user's run's would.)"""
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path_factory.getbasetemp() / "resnetlab-cache"))


@pytest.fixture(scope="session")
def cifar_jpeg_dir() -> Path:
    if not (SHARED_CIFAR_JPEG / "train").is_dir():
        pytest.skip(f"needs the shared CIFAR-10 JPEG copy at {SHARED_CIFAR_JPEG} (absent in a plain clone)")
    return SHARED_CIFAR_JPEG
