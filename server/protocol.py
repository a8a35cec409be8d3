"""OpenAI request models, validated at the edge. Invalid input becomes a 400, never a 500.

Unknown fields are rejected (extra="forbid"): a typo must not silently change behaviour.
OpenAI parameters this server does not implement are declared so they can be accepted at
their no-op value and rejected by name otherwise (see `unsupported_parameters`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


# Parameters of OpenAI's API that this server does not implement, with their no-op values.
# A request may carry them at these values (frontends often send the defaults); any other
# value gets a 400 naming the parameter.
_NOOP_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


class _SamplingFields(_Strict):
    """Fields shared by both endpoints, including dgserve's extensions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions.
    sampler: Literal["ar", "parallel", "diffusion"] | None = None
    steps: int | None = Field(None, ge=1)
    stream_refinements: bool = False
    entropy_bound: float | None = Field(None, gt=0.0)
    t_min: float | None = Field(None, ge=0.0)
    t_max: float | None = Field(None, ge=0.0)
    stability_threshold: int | None = Field(None, ge=0)
    confidence_threshold: float | None = Field(None, ge=0.0)
    # Declared only to be refused by name unless at their no-op value.
    logprobs: Any = None
    top_logprobs: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if len(items) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int | None) -> int | None:
        if value is not None and not (-(2**63) <= value < 2**64):
            raise ValueError("seed must fit in 64 bits")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported_parameters(self) -> list[str]:
        """Names of set OpenAI parameters whose value asks for something not implemented."""
        bad = []
        for name, noop in _NOOP_VALUES.items():
            if name in self.model_fields_set and getattr(self, name, None) not in noop:
                bad.append(name)
        return bad


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None


class CompletionRequest(_SamplingFields):
    # A string, a list of strings, a list of token ids or a list of token-id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and value and isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("token-id prompts must not be empty")
        return value
