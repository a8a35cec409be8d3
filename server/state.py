"""What the app's handlers share, kept on `app.state.dg`: config, metrics, the loaded model and engine."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sampler.runtime.model import LoadedModel
from server.config import ServerConfig
from server.engine import Engine
from server.errors import APIError, overloaded, shutting_down
from server.metrics import Metrics


@dataclass
class ServerState:
    config: ServerConfig
    metrics: Metrics
    # Both set together once the model has loaded and its engine runs (server/startup.py).
    loaded: LoadedModel | None = None
    engine: Engine | None = None
    draining: bool = False  # set on the first SIGTERM (server/cli.py)
    load_error: str | None = None
    # One thread templates and tokenizes request bodies, off the event loop (fast tokenizers are not
    # made for concurrent calls); None outside the app's lifespan: the loop's default executor.
    prompt_executor: ThreadPoolExecutor | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_context(self) -> int:
        assert self.loaded is not None
        return self.config.max_model_len or self.loaded.max_context

    def ready_engine(self) -> Engine:
        """The engine, or the 503 that says why there is none to take work."""
        if self.draining:
            raise shutting_down()
        if self.engine is None or self.loaded is None:
            if self.load_error:
                raise APIError(
                    503, f"The model failed to load: {self.load_error}", type="server_error", code="model_load_failed"
                )
            raise overloaded("The model is still loading.", retry_after_s=5)
        return self.engine

    def ready_model(self) -> LoadedModel:
        """The loaded model, once the engine can take work (else the same 503 as `ready_engine`)."""
        self.ready_engine()
        assert self.loaded is not None
        return self.loaded
