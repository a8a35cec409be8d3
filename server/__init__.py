"""dgserve's HTTP edge: the FastAPI app, OpenAI protocol models, SSE, metrics and the engine."""

__version__ = "0.1.0"
