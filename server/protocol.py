"""OpenAI wire models: requests validated at the edge (invalid input is a 400, never a 500) and the
response, chunk, model-list and error bodies the server sends. See README.md's API section.

Unknown request fields are rejected (extra="forbid"): a typo must not silently change behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, Literal, Protocol, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    field_validator,
    model_serializer,
    model_validator,
)

from sampler.registry import SamplerName
from sampler.types import DiffusionOptions, ParallelOptions, SamplingParams

if TYPE_CHECKING:
    from sampler.constrained import Grammar

_SEED_MASK = (1 << 64) - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class NoOp:
    """Marks an OpenAI parameter this server does not implement (in a field's `Annotated`).

    A request may carry it at one of `values` (frontends often send the defaults); any other
    value gets a 400 naming the parameter (`unsupported_parameters`).
    """

    def __init__(self, *values: Any) -> None:
        self.values = values


# ---- requests --------------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # What the openai SDK's `message.model_dump()` sends back with an assistant turn: all null or
    # empty for a plain reply. A refusal's text stands for the turn when `content` is null;
    # annotations (citations) do not enter the prompt; tool and audio turns are not served.
    refusal: str | None = None
    annotations: list[Any] | None = None
    tool_calls: list[Any] | None = None
    function_call: None = None
    audio: None = None

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tool calls are not supported by this server")
        return value

    @model_validator(mode="after")
    def _assistant_fields(self) -> ChatMessage:
        if self.role != "assistant" and (self.refusal is not None or self.annotations or self.tool_calls is not None):
            raise ValueError("refusal, annotations and tool_calls belong to assistant messages")
        return self

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# OpenAI's rule for a schema's name (chat's json_schema.name, the Responses API's text.format.name).
SchemaName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class JsonSchemaSpec(_Strict):
    """`response_format.json_schema`: OpenAI's named schema. `strict` is accepted either way:
    the output is always held to the schema (docs/openai.md, "Structured output")."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: SchemaName
    description: str | None = None
    # `schema` shadows a BaseModel attribute in pydantic: stored as schema_, sent as "schema".
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    """`response_format`: plain text (the default), any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self

    def json_mode(self) -> tuple[bool, dict[str, Any] | None]:
        """(constrain to JSON?, the schema; None: any JSON object)."""
        if self.type == "text":
            return False, None
        spec = self.json_schema
        return True, (spec.schema_ or {}) if spec is not None else None


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class SamplingDefaults(Protocol):
    """The server's defaults for what a request leaves out (ServerConfig has them)."""

    temperature: float
    top_p: float
    top_k: int


class Extensions(_Strict):
    """Every endpoint's model, temperature and top_p, and dgserve's sampling extensions (the
    Responses API takes them too)."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    sampler: SamplerName | None = None
    steps: int | None = Field(None, ge=1)
    entropy_bound: float | None = Field(None, gt=0.0)
    t_min: float | None = Field(None, ge=0.0)
    t_max: float | None = Field(None, ge=0.0)
    stability_threshold: int | None = Field(None, ge=0)
    confidence_threshold: float | None = Field(None, ge=0.0)

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int | None) -> int | None:
        if value is not None and not (-(2**63) <= value < 2**64):
            raise ValueError("seed must fit in 64 bits")
        return value

    def unsupported_parameters(self) -> list[str]:
        """Names of set OpenAI parameters whose value asks for something not implemented."""
        bad = []
        for name, info in type(self).model_fields.items():
            noop = next((m for m in info.metadata if isinstance(m, NoOp)), None)
            if noop is not None and name in self.model_fields_set and getattr(self, name) not in noop.values:
                bad.append(name)
        return bad


class _SamplingFields(Extensions):
    """Fields shared by both endpoints."""

    # The request field that holds the prompt, named in context-length errors.
    prompt_param: ClassVar[str]
    # The request field that asks for JSON output, named in its errors.
    format_param: ClassVar[str] = "response_format"

    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    # Strict: the string "yes" is not a boolean (pydantic's lax mode would take it as true).
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    stream_refinements: StrictBool = False  # extension
    frequency_penalty: Annotated[Any, NoOp(None, 0, 0.0)] = None
    presence_penalty: Annotated[Any, NoOp(None, 0, 0.0)] = None
    logit_bias: Annotated[Any, NoOp(None, {})] = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if len(items) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def max_tokens_param(self) -> str:
        """The request field that set the completion budget, named in context-length errors."""
        return "max_tokens"

    def json_mode(self) -> tuple[bool, dict[str, Any] | None]:
        """`response_format`'s ask: (constrain to JSON?, the schema or None for any object)."""
        return (False, None) if self.response_format is None else self.response_format.json_mode()

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(alternatives per generated token, per prompt token); None: not asked (no cost)."""
        return None, None

    def to_sampling_params(
        self,
        *,
        max_tokens: int,
        stop_token_ids: Iterable[int],
        choice: int,
        defaults: SamplingDefaults,
        grammar: Grammar | None = None,
    ) -> SamplingParams:
        """Parameters of choice number `choice` (its seed is `seed + choice`, kept to 64 bits)."""
        logprobs, prompt_logprobs = self.logprob_counts()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            top_k=defaults.top_k if self.top_k is None else max(self.top_k, 0),
            seed=None if self.seed is None else (self.seed + choice) & _SEED_MASK,
            stop_token_ids=frozenset(stop_token_ids),
            stream_refinements=self.stream_refinements,
            # `steps` has one meaning per sampler: refinement forwards per block for parallel,
            # denoising steps per block for diffusion.
            parallel=ParallelOptions(steps=self.steps),
            diffusion=DiffusionOptions(
                max_denoising_steps=self.steps,
                entropy_bound=self.entropy_bound,
                t_min=self.t_min,
                t_max=self.t_max,
                stability_threshold=self.stability_threshold,
                confidence_threshold=self.confidence_threshold,
            ),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            grammar=grammar,
        )


class ChatCompletionRequest(_SamplingFields):
    prompt_param = "messages"

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: Annotated[Any, NoOp(None, [])] = None
    tool_choice: Annotated[Any, NoOp(None, "none")] = None
    parallel_tool_calls: Annotated[Any, NoOp(None, True, False)] = None
    functions: Annotated[Any, NoOp(None, [])] = None
    function_call: Annotated[Any, NoOp(None, "none")] = None
    modalities: Annotated[Any, NoOp(None, ["text"])] = None
    audio: Annotated[Any, NoOp(None)] = None
    prediction: Annotated[Any, NoOp(None)] = None
    reasoning_effort: Annotated[Any, NoOp(None)] = None
    service_tier: Annotated[Any, NoOp(None, "auto", "default")] = None
    store: Annotated[Any, NoOp(None, False)] = None
    metadata: Annotated[Any, NoOp(None, {})] = None

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class CompletionRequest(_SamplingFields):
    prompt_param = "prompt"

    # A string, a list of strings, a list of token ids or a list of token-id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 is allowed here with `echo` (score the prompt, generate nothing), as OpenAI's legacy API.
    max_tokens: int | None = Field(None, ge=0)
    # 0-5 alternatives per token (OpenAI's limit); 0 still returns the chosen token's logprob.
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    echo: StrictBool | None = None
    suffix: Annotated[Any, NoOp(None, "")] = None
    best_of: Annotated[Any, NoOp(None, 1)] = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and value and isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("token-id prompts must not be empty")
        return value

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None


# ---- responses -------------------------------------------------------------------------------
class _Wire(BaseModel):
    """A response body. Fields in `omit_when_none` are left out of the JSON when None: OpenAI's
    clients tell an absent key from a null one there (a delta's role, a chunk's refinement)."""

    omit_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_nones(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in self.omit_when_none}


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(_Wire):
    """dgserve's extension: where a request's time went and how many tokens a forward bought."""

    omit_when_none = frozenset({"denoising_steps", "blocks"})

    prompt_tokens: int
    generated_tokens: int
    forward_passes: int
    tokens_per_forward: float | None
    queue_s: float
    time_to_first_token_s: float | None
    total_s: float
    tokens_per_s: float | None
    sampler: str
    # Block diffusion only.
    denoising_steps: int | None = None
    blocks: int | None = None


class AssistantMessage(_Wire):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None
    annotations: list[Any] = []


class TopLogprob(_Wire):
    """A token's text, its UTF-8 bytes and its log-probability (docs/openai.md, "Logprobs")."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Wire):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(_Wire):
    """The legacy completions shape: parallel lists, one entry per token (the first echoed
    prompt token has no logprob: null); `text_offset` is each token's start in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatChoice(_Wire):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class CompletionChoice(_Wire):
    """A completion's choice; streamed chunks carry the same shape with the new text."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class DeltaMessage(_Wire):
    omit_when_none = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Wire):
    index: int
    delta: DeltaMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class Refinement(_Wire):
    """A streamed draft of not-yet-committed tokens (stream_refinements)."""

    index: int
    step: int | None
    draft_ids: list[int]
    draft_text: str


ChoiceT = TypeVar("ChoiceT", bound=BaseModel)


class _ResponseBody(_Wire, Generic[ChoiceT]):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChoiceT]
    usage: Usage
    system_fingerprint: str
    timings: Timings


class ChatCompletionResponse(_ResponseBody[ChatChoice]):
    object: Literal["chat.completion"] = "chat.completion"


class CompletionResponse(_ResponseBody[CompletionChoice]):
    object: Literal["text_completion"] = "text_completion"


class _ChunkBody(_Wire, Generic[ChoiceT]):
    """One SSE chunk. `usage` is null on every chunk but the last when the client asked for
    usage, and absent when it did not: formatters exclude it at dump time."""

    omit_when_none = frozenset({"timings", "refinement"})

    id: str
    object: str
    created: int
    model: str
    choices: list[ChoiceT]
    system_fingerprint: str
    usage: Usage | None = None
    timings: Timings | None = None
    refinement: Refinement | None = None


class ChatCompletionChunk(_ChunkBody[ChatChunkChoice]):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class CompletionChunk(_ChunkBody[CompletionChoice]):
    object: Literal["text_completion"] = "text_completion"


class ModelCard(_Wire):
    omit_when_none = frozenset({"max_model_len"})

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dgserve"
    root: str
    max_model_len: int | None = None  # known once the model has loaded


class ModelList(_Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Wire):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Wire):
    error: ErrorInfo
