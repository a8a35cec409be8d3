"""OpenAI's Responses API for text (POST /v1/responses): the request model, its translation into a
chat request (so templating, limits and sampling are the chat endpoint's own), the response object
and the semantic stream events. Stateless: `store` must be false. See docs/openai.md.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StrictBool, field_validator

from server.choices import Choice
from server.formatters import timings
from server.jobs import Job
from server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    Extensions,
    NoOp,
    Timings,
    _Strict,
    _Wire,
)

TEXT_FORMAT = {"format": {"type": "text"}}


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
    text: Annotated[Any, NoOp(None, TEXT_FORMAT)] = None
    truncation: Annotated[Any, NoOp(None, "disabled")] = None
    reasoning: Annotated[Any, NoOp(None)] = None
    previous_response_id: Annotated[Any, NoOp(None)] = None
    include: Annotated[Any, NoOp(None, [])] = None
    background: Annotated[Any, NoOp(None, False)] = None
    service_tier: Annotated[Any, NoOp(None, "auto", "default")] = None
    top_logprobs: Annotated[Any, NoOp(None, 0)] = None

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

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion: instructions first, as a system message."""
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions is not None else []
        messages += [m.as_chat() for m in self.input]
        shared = self.model_dump(include=set(Extensions.model_fields), exclude_unset=True)
        return _ResponsesAsChat(messages=messages, max_tokens=self.max_output_tokens, stream=self.stream, **shared)


class _ResponsesAsChat(ChatCompletionRequest):
    """A chat request whose errors name the Responses API's fields."""

    prompt_param: ClassVar[str] = "input"

    def max_tokens_param(self) -> str:
        return "max_output_tokens"


# ---- response --------------------------------------------------------------------------------
class OutputText(_Wire):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


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
    tool_choice: Literal["none"] = "none"
    tools: list[Any] = []
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None
    metadata: dict[str, str]
    timings: Timings | None = None  # extension, as on chat


def new_response_id() -> str:
    return "resp_" + uuid.uuid4().hex


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

    def message(self, text: str, status: Literal["in_progress", "completed", "incomplete"]) -> OutputMessage:
        return OutputMessage(id=self.message_id, status=status, content=[OutputText(text=text)])

    def response(self, choices: list[Choice] | None = None) -> dict[str, Any]:
        """The response object: in progress without `choices`, finished with them."""
        status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
        output, usage, spent = [], None, None
        if choices is not None:
            (choice,) = choices
            status = "incomplete" if choice.finish_reason == "length" else "completed"
            output = [self.message(choice.text, status)]
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
            usage=usage,
            user=self.req.user,
            metadata=self.req.metadata or {},
            timings=spent,
        ).model_dump()

    def event(self, type: str, **fields: Any) -> dict[str, Any]:
        """One stream event, numbered in sending order."""
        self._sequence += 1
        return {"type": type, "sequence_number": self._sequence - 1, **fields}

    def _part(self, type: str, text: str) -> dict[str, Any]:
        part = OutputText(text=text).model_dump()
        return self.event(type, item_id=self.message_id, output_index=0, content_index=0, part=part)

    def opening(self) -> list[dict[str, Any]]:
        """The events before any text."""
        body = self.response()
        return [
            self.event("response.created", response=body),
            self.event("response.in_progress", response=body),
            self.event("response.output_item.added", output_index=0, item=self.message("", "in_progress").model_dump()),
            self._part("response.content_part.added", ""),
        ]

    def delta(self, text: str) -> dict[str, Any]:
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        return self.event("response.output_text.delta", delta=text, logprobs=[], **where)

    def closing(self, choices: list[Choice]) -> list[dict[str, Any]]:
        """The events after the last text: the text, part, item and response, finished."""
        body = self.response(choices)
        item = body["output"][0]
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        final = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        return [
            self.event("response.output_text.done", text=item["content"][0]["text"], logprobs=[], **where),
            self._part("response.content_part.done", item["content"][0]["text"]),
            self.event("response.output_item.done", output_index=0, item=item),
            self.event(final, response=body),
        ]
