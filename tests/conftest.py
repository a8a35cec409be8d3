"""Shared fixtures: the tiny model (loaded once) and a live dgserve server on 127.0.0.1.

The live-server, polling and SSE helpers themselves live in bench/ (live_server.py, polling.py,
sse.py), so that the benchmarks share them without importing tests/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from bench.live_server import LiveServer

if TYPE_CHECKING:
    from sampler.runtime.model import LoadedModel

# Idle OpenMP workers must not spin while a live tiny-model server shares the cores with the test
# process (a tiny-model request measured 30x slower on a shared 2-core box); the servers the tests
# start inherit it. Set before any test module imports torch (none of the imports above does).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def tiny_server() -> Iterator[LiveServer]:
    with LiveServer.dgserve("configs/tiny.yaml") as server:
        yield server.wait_ready()


@pytest.fixture(scope="session")
def dgserve_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs `dgserve *args` (as `python -m server.cli`) to its end, its output captured as text."""

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "server.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def tiny_loaded() -> LoadedModel:
    from sampler.runtime.loading import load_model

    # The certified head off: `auto` times it at load, and on a tiny head that timing is noise, so
    # tests that hook the head or count model forwards would see one path or the other by chance
    # (tests/test_certified_head.py loads it on purpose).
    return load_model("tiny-gemma3", dtype="float32", device="cpu", certified="off")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models are all per-op overhead: on a shared 2-core box two torch threads hand off
    more than they compute (about 10x slower measured), so their tests run single-threaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
