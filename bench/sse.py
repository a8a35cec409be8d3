"""Reading Server-Sent Events as the OpenAI-style streaming endpoints send them.

An event is `event: NAME` (optional; dgserve names only its extension events) and `data: ...`
lines ended by a blank line; OpenAI streams end with the event `data: [DONE]`. Shared by the
tests and `dgserve bench-load`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

DONE = "[DONE]"

SseEvent = tuple[str | None, str]  # (event name, or None for the default "message"; data)


class SseParser:
    """Turns lines (without their line ending) into events, one blank line ending each."""

    def __init__(self) -> None:
        self._name: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> SseEvent | None:
        """The event this line completes, if it is the blank line after one."""
        if not line:
            return self.close()
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        return None  # comments (`: ...`) and fields dgserve never sends are ignored

    def close(self) -> SseEvent | None:
        """The pending event, if any: at a blank line, or at the end of a body not ended by one."""
        event = (self._name, "\n".join(self._data)) if self._data else None
        self._name, self._data = None, []
        return event


def iter_sse_events(lines: Iterable[str]) -> Iterator[SseEvent]:
    parser = SseParser()
    for line in lines:
        if event := parser.feed(line):
            yield event
    if event := parser.close():
        yield event


async def aiter_sse_events(lines: AsyncIterable[str]) -> AsyncIterator[SseEvent]:
    parser = SseParser()
    async for line in lines:
        if event := parser.feed(line):
            yield event
    if event := parser.close():
        yield event


def sse_events(body: str) -> list[SseEvent]:
    """Every event of a whole SSE body, in order, the final (None, "[DONE]") included."""
    return list(iter_sse_events(body.splitlines()))


def iter_sse_json(lines: Iterable[str]) -> Iterator[Any]:
    """The JSON data of every event of a stream, whatever its name, [DONE] left out."""
    for _, data in iter_sse_events(lines):
        if data != DONE:
            yield json.loads(data)


async def aiter_sse_json(lines: AsyncIterable[str]) -> AsyncIterator[Any]:
    """`iter_sse_json` over an async line stream (httpx's `Response.aiter_lines()`)."""
    async for _, data in aiter_sse_events(lines):
        if data != DONE:
            yield json.loads(data)
