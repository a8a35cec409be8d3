"""A server process on a free loopback port, as the tests and `dgserve bench-load` run one.

`LiveServer.dgserve(config)` starts `python -m server.cli`, `LiveServer.llama_server(...)` llama.cpp's
server on a GGUF (the peer of `dgserve bench` and `dgserve bench-load`); any other OpenAI-compatible
server (bench-load's `transformers serve` peer) starts from its command line. Shared by the tests and
the benchmarks (bench must not import tests/).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from bench.polling import wait_until

HOST = "127.0.0.1"


class ServerNotReady(RuntimeError):
    """The server exited, or did not answer its readiness probe in time; the message has its log's tail."""


def free_port() -> int:
    """A port nothing listens on now (the OS picks it; another process could take it before us)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def metric_value(exposition: str, name: str) -> float:
    """The first sample of the series `name` (labelled or not) in a Prometheus text exposition."""
    for line in exposition.splitlines():
        if line.startswith((name + "{", name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise LookupError(f"metric {name} is not exported")


def dgserve_command(config: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "--config", config, "--host", HOST, "--port", str(port), *extra]


def llama_server_command(exe: str, gguf: Path, port: int, *, parallel: int, max_tokens: int, threads: int) -> list[str]:
    """llama.cpp's server at `exe` on `gguf`: `parallel` slots (one per concurrent client), each
    with room for a prompt and `max_tokens` (the context is split evenly between slots), and
    `threads` threads (the benchmarks pass the torch thread count dgserve runs with)."""
    per_slot = 1024 + max_tokens
    return [
        exe,
        "-m",
        str(gguf),
        "--host",
        HOST,
        "--port",
        str(port),
        "--parallel",
        str(parallel),
        "-c",
        str(parallel * per_slot),
        "-t",
        str(threads),
    ]


def llama_server_gguf(config: Any) -> Path:
    """The GGUF llama-server loads for a dgserve config: the built-in model's assembled file, or
    the config's own .gguf; any other model has none (SystemExit, the benchmarks' CLI error)."""
    from sampler.runtime.loading import builtin_gemma3_270m_gguf
    from sampler.runtime.model import BUILTIN_GEMMA3_270M

    if config.model == BUILTIN_GEMMA3_270M:
        return builtin_gemma3_270m_gguf()
    if str(config.model).endswith(".gguf"):
        return Path(config.model).expanduser()
    raise SystemExit(f"--peer-llama-server needs a GGUF model; {config.model} is not one")


class LiveServer:
    """A server process listening on 127.0.0.1:`port`, its stdout and stderr in a log file.

    Use it as a context manager (or call `stop`): leaving stops the process.
    """

    def __init__(
        self,
        command: Sequence[str],
        port: int,
        *,
        env: Mapping[str, str] | None = None,
        ready_path: str = "/ready",
        log_path: Path | None = None,
    ) -> None:
        self.port = port
        self.base_url = f"http://{HOST}:{port}"
        self.ready_url = self.base_url + ready_path
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"live-server-{port}.log"
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the handle
            self.proc = subprocess.Popen(
                list(command), stdout=log, stderr=subprocess.STDOUT, env=None if env is None else dict(env)
            )

    @classmethod
    def dgserve(
        cls,
        config: str,
        *extra: str,
        env: Mapping[str, str] | None = None,
        base_env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> LiveServer:
        """`dgserve --config config *extra` on a free port, its environment `base_env` (default:
        this process's) updated with `env`."""
        port = free_port()
        environ = {**(os.environ if base_env is None else base_env), **(env or {})}
        return cls(dgserve_command(config, port, *extra), port, env=environ, log_path=log_path)

    @classmethod
    def llama_server(cls, exe: str, gguf: Path, *, parallel: int, max_tokens: int, threads: int) -> LiveServer:
        """llama.cpp's `llama-server` at `exe` on `gguf` on a free port (`llama_server_command`);
        ready when its /health answers 200 (it answers 503 while the model loads)."""
        port = free_port()
        command = llama_server_command(exe, gguf, port, parallel=parallel, max_tokens=max_tokens, threads=threads)
        return cls(command, port, ready_path="/health")

    def wait_ready(self, timeout: float = 180.0) -> LiveServer:
        """Block until the readiness probe answers 200; on failure stop the process and raise."""
        try:
            if wait_until(self._is_ready, timeout, interval=0.2):
                return self
            message = f"{self.ready_url} not ready after {timeout} s"
        except ServerNotReady as exited:
            message = str(exited)
        self.stop()
        raise ServerNotReady(f"{message}; log {self.log_path} ends:\n{self.log()[-4000:]}")

    def _is_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise ServerNotReady(f"server exited with {self.proc.returncode} before {self.ready_url} answered")
        try:
            return httpx.get(self.ready_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False  # not listening yet

    def metric(self, name: str) -> float:
        """The current value of one series of the server's /metrics (gauges, counters)."""
        return metric_value(httpx.get(f"{self.base_url}/metrics", timeout=5).text, name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (dgserve drains, then exits), SIGKILL after `timeout` s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
