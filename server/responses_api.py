"""OpenAI's Responses API for text (POST /v1/responses): the request model, its translation into a
chat request (so templating, limits, sampling, logprobs and JSON output are the chat endpoint's
own), the response object and the semantic stream events. Stateless: `store` must be false. See
docs/openai.md ("Responses API").
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from server.choices import Choice, TokenEntry
from server.formatters import chat_logprobs, timings
from server.jobs import Job
from server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ChatTokenLogprob,
    Extensions,
    JsonSchemaSpec,
    NoOp,
    ResponseFormat,
    SchemaName,
    Timings,
    _Strict,
    _Wire,
)

TEXT_FORMAT = {"format": {"type": "text"}}
# The `include` value that asks for the output text's per-token logprobs (OpenAI's spelling).
LOGPROBS_INCLUDE = "message.output_text.logprobs"


# ---- request ---------------------------------------------------------------------------------
class InputText(_Strict):
    """A text part of an input message; `output_text` parts come back when a client replays
    a previous response's output as input."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]
    # Carried by a replayed output message; they do not enter the prompt.
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    def as_chat(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage(role=self.role, content=text)


class TextFormat(_Strict):
    """`text.format`: chat's `response_format` in the Responses API's flat spelling: plain text,
    any JSON object, or JSON valid against a named schema (`strict` accepted either way: the
    output is always held to the schema; docs/openai.md, "Structured output")."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: SchemaName | None = None
    description: str | None = None
    # `schema` shadows a BaseModel attribute in pydantic: stored as schema_, sent as "schema".
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None

    @model_validator(mode="after")
    def _schema_fields(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("type json_schema needs a name and a schema")
        if self.type != "json_schema" and self.model_fields_set - {"type"}:
            raise ValueError("name, description, schema and strict belong to type json_schema")
        return self

    def as_response_format(self) -> ResponseFormat:
        """The same ask as chat's `response_format`."""
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        assert self.name is not None  # checked by _schema_fields
        spec = JsonSchemaSpec(name=self.name, description=self.description, schema=self.schema_, strict=self.strict)
        return ResponseFormat(type="json_schema", json_schema=spec)


class TextConfig(_Strict):
    """`text`: the output's format. `verbosity` is a reasoning model's knob: only its default is taken."""

    format: TextFormat = Field(default_factory=lambda: TextFormat.model_validate({"type": "text"}))
    verbosity: Literal["medium"] | None = None

    def echo(self) -> dict[str, Any]:
        """The `text` field of the response object: what the request asked, format filled in."""
        return self.model_dump(by_alias=True, exclude_none=True)


class ResponsesRequest(Extensions):
    # A string is one user message (made so before validation, so errors name input.N.field).
    input: list[InputMessage] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: StrictBool | None = False
    store: StrictBool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    tools: Annotated[Any, NoOp(None, [])] = None
    tool_choice: Annotated[Any, NoOp(None, "none", "auto")] = None
    parallel_tool_calls: Annotated[Any, NoOp(None, True, False)] = None
    text: TextConfig | None = None
    truncation: Annotated[Any, NoOp(None, "disabled")] = None
    reasoning: Annotated[Any, NoOp(None)] = None
    previous_response_id: Annotated[Any, NoOp(None)] = None
    # Only the output text's logprobs: the other includable items (tool results, reasoning,
    # images) are outputs this server never produces. Other values are 400s naming include.N.
    include: list[Literal["message.output_text.logprobs"]] | None = None
    background: Annotated[Any, NoOp(None, False)] = None
    service_tier: Annotated[Any, NoOp(None, "auto", "default")] = None
    # Alternatives per token, as chat's; logprobs come back only with `include` (as OpenAI's).
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)

    @field_validator("input", mode="before")
    @classmethod
    def _string_is_a_user_message(cls, value: Any) -> Any:
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    @field_validator("store")
    @classmethod
    def _stateless(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("this server keeps no responses; send store: false")
        return value

    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or [])

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion: instructions first, as a system message; the
        logprobs `include` as chat's `logprobs: true`, `text.format` as its `response_format`."""
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions is not None else []
        messages += [m.as_chat() for m in self.input]
        shared: dict[str, Any] = self.model_dump(include=set(Extensions.model_fields), exclude_unset=True)
        if self.wants_logprobs():
            shared.update(logprobs=True, top_logprobs=self.top_logprobs)
        if self.text is not None:
            shared.update(response_format=self.text.format.as_response_format())
        return _ResponsesAsChat(messages=messages, max_tokens=self.max_output_tokens, stream=self.stream, **shared)


class _ResponsesAsChat(ChatCompletionRequest):
    """A chat request whose errors name the Responses API's fields."""

    prompt_param: ClassVar[str] = "input"
    format_param: ClassVar[str] = "text.format"

    def max_tokens_param(self) -> str:
        return "max_output_tokens"


# ---- response --------------------------------------------------------------------------------
class OutputText(_Wire):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    # Chat's per-token shape (token, logprob, bytes, top_logprobs) is OpenAI's here too.
    logprobs: list[ChatTokenLogprob] = []


class OutputMessage(_Wire):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ResponseUsage(_Wire):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(_Wire):
    omit_when_none = frozenset({"timings"})

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool = False
    previous_response_id: None = None
    store: bool = False
    temperature: float
    top_p: float
    text: dict[str, Any] = TEXT_FORMAT
    top_logprobs: int = 0
    tool_choice: Literal["none"] = "none"
    tools: list[Any] = []
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None
    metadata: dict[str, str]
    timings: Timings | None = None  # extension, as on chat


def new_response_id() -> str:
    return "resp_" + uuid.uuid4().hex


def output_logprobs(entries: list[TokenEntry] | None) -> list[ChatTokenLogprob]:
    """The logprobs of an output_text part or delta: chat's entries; [] when not asked."""
    found = chat_logprobs(entries)
    return (found.content or []) if found is not None else []


class ResponseBuilder:
    """The response object of one request, in progress or finished, and its stream events.

    The event order is OpenAI's: response.created, response.in_progress, output_item.added,
    content_part.added, output_text.delta..., output_text.done, content_part.done,
    output_item.done, then response.completed (or response.incomplete when max_output_tokens
    cut the text). Every event carries an increasing sequence_number.
    """

    def __init__(self, req: ResponsesRequest, job: Job, defaults: Any) -> None:
        self.req = req
        self.job = job
        self.message_id = "msg_" + uuid.uuid4().hex
        self.temperature = defaults.temperature if req.temperature is None else req.temperature
        self.top_p = defaults.top_p if req.top_p is None else req.top_p
        self._sequence = 0

    def message(
        self,
        text: str,
        status: Literal["in_progress", "completed", "incomplete"],
        entries: list[TokenEntry] | None = None,
    ) -> OutputMessage:
        part = OutputText(text=text, logprobs=output_logprobs(entries))
        return OutputMessage(id=self.message_id, status=status, content=[part])

    def response(self, choices: list[Choice] | None = None) -> dict[str, Any]:
        """The response object: in progress without `choices`, finished with them."""
        status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
        output, usage, spent = [], None, None
        if choices is not None:
            (choice,) = choices
            status = "incomplete" if choice.finish_reason == "length" else "completed"
            output = [self.message(choice.text, status, choice.entries)]
            usage = ResponseUsage(
                input_tokens=self.job.prompt_tokens,
                input_tokens_details={"cached_tokens": 0},
                output_tokens=choice.tokens,
                output_tokens_details={"reasoning_tokens": 0},
                total_tokens=self.job.prompt_tokens + choice.tokens,
            )
            spent = timings(self.job, choices)
        return ResponseObject(
            id=self.job.request_id,
            created_at=self.job.created,
            status=status,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            instructions=self.req.instructions,
            max_output_tokens=self.req.max_output_tokens,
            model=self.job.model,
            output=output,
            temperature=self.temperature,
            top_p=self.top_p,
            text=TEXT_FORMAT if self.req.text is None else self.req.text.echo(),
            top_logprobs=self.req.top_logprobs or 0,
            usage=usage,
            user=self.req.user,
            metadata=self.req.metadata or {},
            timings=spent,
        ).model_dump()

    def event(self, type: str, **fields: Any) -> dict[str, Any]:
        """One stream event, numbered in sending order."""
        self._sequence += 1
        return {"type": type, "sequence_number": self._sequence - 1, **fields}

    def _part(self, type: str, part: dict[str, Any]) -> dict[str, Any]:
        return self.event(type, item_id=self.message_id, output_index=0, content_index=0, part=part)

    def opening(self) -> list[dict[str, Any]]:
        """The events before any text."""
        body = self.response()
        return [
            self.event("response.created", response=body),
            self.event("response.in_progress", response=body),
            self.event("response.output_item.added", output_index=0, item=self.message("", "in_progress").model_dump()),
            self._part("response.content_part.added", OutputText(text="").model_dump()),
        ]

    def delta(self, text: str, entries: list[TokenEntry] | None = None) -> dict[str, Any]:
        """New text and, when asked, its tokens' logprobs (a token inside a UTF-8 character
        brings "" text and its logprob; the token completing it brings the character)."""
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        logprobs = [lp.model_dump() for lp in output_logprobs(entries)]
        return self.event("response.output_text.delta", delta=text, logprobs=logprobs, **where)

    def closing(self, choices: list[Choice]) -> list[dict[str, Any]]:
        """The events after the last text: the text, part, item and response, finished."""
        body = self.response(choices)
        item = body["output"][0]
        part = item["content"][0]
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        final = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        return [
            self.event("response.output_text.done", text=part["text"], logprobs=part["logprobs"], **where),
            self._part("response.content_part.done", part),
            self.event("response.output_item.done", output_index=0, item=item),
            self.event(final, response=body),
        ]
