"""`dgserve` command line: serve (default), `dgserve bench ...`, `bench-load ...` or `bench-steps ...`."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from types import FrameType

from sampler.registry import SAMPLER_NAMES
from server import __version__
from server.config import ConfigError, ServerConfig, load_config

log = logging.getLogger("dgserve")


_SUBCOMMANDS = """subcommands:
  (none)         serve: the OpenAI-compatible API, /metrics and the playground at http://HOST:PORT/
  bench          AR against parallel refinement on a prompt file (dgserve bench --help)
  bench-load     concurrent-load benchmark against a live server (dgserve bench-load --help)
  bench-steps    cost of one forward by row count and kernel (dgserve bench-steps --help)

Precedence: flags, then env vars DGSERVE_<KEY>, then the --config file, then the defaults shown.
Every config key (README.md, "Configuration") can come from the file or the environment."""


def _default(key: str) -> str:
    """A config key's built-in default, for the help text (flags themselves default to None so a
    config file's value is not overridden by a flag that was never given)."""
    return f"(default: {ServerConfig.model_fields[key].default})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dgserve",
        description="OpenAI-compatible Gemma server with parallel-refinement and block-diffusion samplers.",
        epilog=_SUBCOMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"dgserve {__version__}")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--host", help=_default("host"))
    p.add_argument("--port", type=int, help=_default("port"))
    p.add_argument("--model", help="built-in name, .gguf file, local directory or hub id " + _default("model"))
    p.add_argument("--served-model-name", dest="served_model_name", help="the id clients send (default: --model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], help=_default("dtype"))
    p.add_argument("--device", help=_default("device"))
    p.add_argument("--sampler", choices=SAMPLER_NAMES, help=_default("sampler"))
    p.add_argument("--api-key", dest="api_key", help=_default("api_key"))
    p.add_argument("--log-level", dest="log_level", help=_default("log_level"))
    return p


class _QuietProbes(logging.Filter):
    """Keep health, readiness and scrape requests out of the access log (they come every few s)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) >= 3 and str(args[2]).split("?")[0] in ("/health", "/ready", "/metrics"))


def _serve(config: ServerConfig) -> int:
    import uvicorn

    from server.app import create_app

    logging.getLogger("uvicorn.access").addFilter(_QuietProbes())
    app = create_app(config)
    state = app.state.dg

    class DrainingServer(uvicorn.Server):
        """First SIGTERM/SIGINT: stop taking work, let in-flight requests finish (up to
        shutdown_grace_s), then exit 0. A second signal exits at once."""

        draining = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.draining or state.engine is None:
                return super().handle_exit(sig, frame)
            self.draining = True
            state.draining = True
            state.engine.stop_accepting()
            log.info("signal %s: draining for up to %.0f s", sig, config.shutdown_grace_s)
            threading.Thread(target=self._drain, daemon=True).start()

        def _drain(self) -> None:
            deadline = time.monotonic() + config.shutdown_grace_s
            while time.monotonic() < deadline and not state.engine.idle():
                time.sleep(0.05)
            # Let the handlers write their last bytes before connections are closed.
            time.sleep(0.2)
            self.should_exit = True

    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            timeout_graceful_shutdown=max(1, int(config.shutdown_grace_s)),
        )
    )
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    # OpenMP's wait policy is left to libgomp's default (spin briefly, then sleep): forcing PASSIVE
    # wakes sleeping workers for each of the ~4,000 ops of a decode step, and measured 27.5 vs
    # 35.2 tok/s for one streaming client on the 270M (2-core AVX2, docs/load.md). The test suite
    # sets PASSIVE for its tiny-model servers, which share the cores with the test process
    # (tests/conftest.py). An explicit OMP_WAIT_POLICY is honoured either way.
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "bench-load":
        from bench.load import run as bench_load

        return bench_load(argv[1:])
    if argv and argv[0] == "bench-steps":
        from bench.step_cost import run as bench_steps

        return bench_steps(argv[1:])
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"dgserve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info(
        "starting: model=%s dtype=%s device=%s sampler=%s on http://%s:%d",
        config.model,
        config.dtype,
        config.device,
        config.sampler,
        config.host,
        config.port,
    )
    return _serve(config)


if __name__ == "__main__":
    sys.exit(main())
