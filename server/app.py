"""The FastAPI app: state, middleware, error handlers and routers put together (see server/routes/)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from sampler.runtime.model import LoadedModel
from server import __version__
from server.config import ServerConfig
from server.error_responses import install_error_handlers
from server.metrics import Metrics
from server.middleware import LimitsAndAuth
from server.routes import completions, models, playground, probes, responses
from server.startup import lifespan
from server.state import ServerState


def create_app(config: ServerConfig, loaded: LoadedModel | None = None) -> FastAPI:
    """Build the app. With `loaded` the engine starts at once; otherwise the model loads in
    the background after start-up and /ready answers 503 until it is there."""
    state = ServerState(config=config, metrics=Metrics(config.model_name))
    app = FastAPI(title="dgserve", version=__version__, lifespan=lifespan(state, loaded))
    app.state.dg = state
    app.add_middleware(LimitsAndAuth, state=state)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials=False,
        )
    install_error_handlers(app)
    for group in (probes, models, completions, responses):
        app.include_router(group.router)
    app.include_router(playground.router if config.playground else playground.landing_router)
    return app
