"""Shared fixtures: the tiny model (loaded once) and a live dgserve server on 127.0.0.1."""

from __future__ import annotations

import os

# As the CLI does: idle OpenMP workers must not spin while a live server shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real `dgserve` process on a free loopback port."""

    def __init__(self, config: str, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dgserve-test-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "--config", config, "--host", "127.0.0.1",
             "--port", str(self.port), *extra],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 180.0) -> "LiveServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def tiny_server() -> Iterator[LiveServer]:
    server = LiveServer("configs/tiny.yaml").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_loaded():
    from sampler.runtime.loading import load_model

    return load_model("tiny-gemma3", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models are all per-op overhead: on a shared 2-core box two torch threads hand off
    more than they compute (about 10x slower measured), so their tests run single-threaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
