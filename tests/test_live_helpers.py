"""The helpers the tests and bench-load share (bench/live_server.py, polling.py, sse.py)."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from bench.live_server import LiveServer, ServerNotReady, free_port, metric_value
from bench.polling import wait_until, wait_until_async
from bench.sse import aiter_sse_json, iter_sse_json, sse_events

BODY = (
    'data: {"n": 1}\n\n'
    ": a comment line, ignored\n"
    "event: refinement\n"
    'data: {"n": 2}\n\n'
    "data: first\n"
    "data:second\n\n"
    "event: error\r\n"
    'data: {"error": {"code": "timeout"}}\r\n\r\n'
    "data: [DONE]"  # no blank line after the last event: still read
)


def test_sse_events_name_data_and_done():
    assert sse_events(BODY) == [
        (None, '{"n": 1}'),
        ("refinement", '{"n": 2}'),
        (None, "first\nsecond"),  # data lines of one event join with a newline
        ("error", '{"error": {"code": "timeout"}}'),
        (None, "[DONE]"),
    ]
    assert sse_events("") == []


def test_sse_json_line_by_line_leaves_out_done():
    lines = 'data: {"a": 1}\n\nevent: error\ndata: {"b": 2}\n\ndata: [DONE]\n\n'.split("\n")
    assert list(iter_sse_json(lines)) == [{"a": 1}, {"b": 2}]

    async def lines_async():
        for line in lines:
            yield line

    async def collect():
        return [chunk async for chunk in aiter_sse_json(lines_async())]

    assert asyncio.run(collect()) == [{"a": 1}, {"b": 2}]


def test_metric_value_reads_labelled_and_plain_series():
    exposition = (
        "# HELP dgserve_requests_running Running.\n"
        "# TYPE dgserve_requests_running gauge\n"
        'dgserve_requests_running_total{model_name="m"} 9.0\n'
        'dgserve_requests_running{model_name="m"} 2.0\n'
        "process_open_fds 17.0\n"
    )
    assert metric_value(exposition, "dgserve_requests_running") == 2.0  # not the *_total series
    assert metric_value(exposition, "process_open_fds") == 17.0
    with pytest.raises(LookupError):
        metric_value(exposition, "dgserve_requests_waiting")


def test_wait_until_returns_as_soon_as_true_and_false_at_the_deadline():
    calls = []
    assert wait_until(lambda: calls.append(1) or len(calls) == 3, timeout=5, interval=0.001)
    assert len(calls) == 3
    started = time.monotonic()
    assert not wait_until(lambda: False, timeout=0.05, interval=0.01)
    assert 0.05 <= time.monotonic() - started < 2
    assert asyncio.run(wait_until_async(lambda: True, timeout=0))
    assert not asyncio.run(wait_until_async(lambda: False, timeout=0.02, interval=0.01))


def test_a_server_that_exits_is_reported_with_its_log():
    server = LiveServer([sys.executable, "-c", "print('no model here'); raise SystemExit(3)"], free_port())
    with pytest.raises(ServerNotReady, match=r"(?s)exited with 3.*no model here"):
        server.wait_ready(timeout=30)
    assert server.proc.returncode == 3
