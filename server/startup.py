"""Start-up and shutdown: load the model (now or in the background) and start or stop its engine."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI

from sampler.constrained import llg_tokenizer
from sampler.registry import build_sampler, prepare_prefix_cache
from sampler.runtime.loading import load_model
from sampler.runtime.model import LoadedModel
from sampler.types import BatchSampler
from server.config import ServerConfig
from server.engine import Engine
from server.state import ServerState

log = logging.getLogger("dgserve.app")


def prepare_structured_output(loaded: LoadedModel) -> None:
    """Build llguidance's tokenizer now, so the first `response_format` / `text.format` JSON
    request does not pay it (4-7 s on Gemma's vocabulary; docs/openai.md, "Structured output").

    It runs in the start-up step, before the engine starts, not on a background thread: the
    build holds the GIL throughout, so a thread would freeze the event loop and the model thread
    for seconds while /ready already said yes. A block-diffusion model serves no JSON (skipped).
    A tokenizer llguidance cannot read is logged; JSON requests then answer its error as a 400.
    """
    if loaded.kind != "causal":
        return
    started = time.monotonic()
    try:
        tokenizer = llg_tokenizer(loaded.tokenizer)
    except Exception as exc:
        log.warning("structured output unavailable: llguidance cannot read this tokenizer (%s)", exc)
        return
    log.info(
        "structured output: llguidance tokenizer (%d tokens) built in %.2f s",
        tokenizer.vocab_size, time.monotonic() - started,
    )  # fmt: skip


def load_configured(cfg: ServerConfig) -> LoadedModel:
    """The config's model with the config's dtype, device, kernels, head and quantization."""
    return load_model(
        cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        cpu_gemm=cfg.cpu_gemm,
        certified=cfg.certified_head,
        quantization=cfg.quantization,
    )


def start_engine(state: ServerState, loaded: LoadedModel) -> None:
    """Prepare structured output, then start the model thread; the handlers see the model and
    its engine from here on."""
    cfg = state.config
    prepare_structured_output(loaded)
    prepare_prefix_cache(loaded, cfg.sampler_options("ar"))

    def factory(name: str) -> BatchSampler:
        return build_sampler(name, loaded, cfg.sampler_options(name))

    engine = Engine(factory, max_num_seqs=cfg.max_num_seqs, max_queue=cfg.max_queue, metrics=state.metrics)
    engine.start()
    state.loaded = loaded
    state.engine = engine


def where_to_go(cfg: ServerConfig) -> str:
    """The URLs for the "ready" line: uvicorn prints its own while the model is still loading
    (about a minute on a first start), so the line that says the server can answer repeats them."""
    # A wildcard bind is reachable on loopback; a browser cannot open http://0.0.0.0/ everywhere.
    host = "127.0.0.1" if cfg.host in ("", "0.0.0.0") else "[::1]" if cfg.host == "::" else cfg.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    base = f"http://{host}:{cfg.port}" if cfg.port else f"http://{host}:<the port uvicorn printed>"
    page = f"open {base}/ for the playground" if cfg.playground else "playground off"
    return f"{page}, API base {base}/v1"


def load_in_background(state: ServerState) -> threading.Thread:
    """Load the configured model on a thread; a failure is kept in `state.load_error` (503s)."""
    cfg = state.config

    def load() -> None:
        started = time.monotonic()
        # uvicorn prints its URL now, long before the model can answer: say what to wait for.
        log.info("loading %s; /ready answers 503 until the 'ready:' line below", cfg.model)
        try:
            loaded = load_configured(cfg)
        except Exception as exc:
            log.exception("model %s failed to load", cfg.model)
            state.load_error = f"{type(exc).__name__}: {exc}"
            return
        start_engine(state, loaded)
        log.info(
            "ready: %s; model=%s served as %s, kind=%s, dtype=%s, device=%s, sampler=%s, "
            "defaults temperature=%s top_p=%s top_k=%s max_tokens=%s, context=%d (%.1f s to load)",
            where_to_go(cfg), cfg.model, cfg.model_name, loaded.kind, cfg.dtype, loaded.device, cfg.sampler,
            cfg.temperature, cfg.top_p, cfg.top_k, cfg.default_max_tokens, state.max_context,
            time.monotonic() - started,
        )  # fmt: skip

    thread = threading.Thread(target=load, name="dgserve-loader", daemon=True)
    thread.start()
    return thread


def lifespan(state: ServerState, loaded: LoadedModel | None) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: with `loaded` the engine starts at once, else the model loads in the
    background and /ready answers 503 until it is there. The engine stops at shutdown."""

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        state.prompt_executor = ThreadPoolExecutor(1, thread_name_prefix="dgserve-prompts")
        if loaded is not None:
            start_engine(state, loaded)
        else:
            load_in_background(state)
        yield
        if state.engine is not None:
            state.engine.shutdown()
        state.prompt_executor.shutdown(wait=False)

    return run
