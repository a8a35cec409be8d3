"""`dgserve bench-load` (bench/load.py): the CLI end to end on the tiny model, and its arithmetic on
scripted measurements."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import load


def test_bench_load_smoke(tmp_path, dgserve_cli):
    out = tmp_path / "load.json"
    argv = "bench-load --config configs/tiny.yaml --dtype float32 --max-tokens 6 --limit 2 --concurrency 1,2"
    proc = dgserve_cli(*argv.split(), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert [lvl["concurrency"] for lvl in data["levels"]] == [1, 2]
    # Levels keep every client busy for several requests: max(prompts, 4 x concurrency).
    assert [lvl["requests"] for lvl in data["levels"]] == [4, 8]
    for lvl in data["levels"]:
        assert lvl["aggregate_tokens_per_s"] > 0 and lvl["ttft_p95_s"] >= lvl["ttft_p50_s"] >= 0
        assert lvl["texts_identical_to_first_level"]
    assert data["sampler"] == "ar"  # tiny.yaml serves ar; the in-process baseline runs the same sampler
    assert data["in_process_tokens_per_s"] > 0 and data["http_single_client_tokens_per_s"] > 0
    assert data["http_overhead"] < 1  # HTTP delivered tokens (its arithmetic: the test below)
    assert data["levels"][-1]["in_process_tokens_per_s"] > 0  # the top level's no-server ceiling
    assert "conc" in proc.stdout  # the table


def test_http_overhead_with_no_prompts_is_not_measured():
    # `--overhead-prompts 0` skips the measurement (it crashed on the warm-up's prompts[0]).
    assert load._http_overhead("http://127.0.0.1:9", "m", None, None, [], 8) == {}


def test_http_overhead_weighs_tokens_over_time_and_skips_the_warm_ups(monkeypatch):
    # (tokens, seconds) per call: the warm-up first on each side, then prompts "a" and "b".
    http = iter([(1, 100.0), (10, 1.0), (30, 2.0)])
    in_process = iter([(1, 100.0), (10, 0.5), (30, 1.5)])

    async def one_request(client, model, prompt, max_tokens):
        tokens, seconds = next(http)
        return {"tokens": tokens, "latency_s": seconds, "ttft_s": 0.0, "text": ""}

    monkeypatch.setattr(load, "_one", one_request)
    monkeypatch.setattr(load, "_run_in_process", lambda *args: next(in_process))
    result = load._http_overhead("http://127.0.0.1:9", "m", None, None, ["a", "b"], 8)
    # 40 tokens in 3 s over HTTP, 40 in 2 s in process: a third of the in-process rate is lost.
    assert result["http_single_client_tokens_per_s"] == pytest.approx(40 / 3)
    assert result["in_process_tokens_per_s"] == pytest.approx(20.0)
    assert result["http_overhead"] == pytest.approx(1 / 3)
    assert next(http, None) is None and next(in_process, None) is None  # one call per side per prompt


def test_percentile_picks_the_nearest_rank():
    values = [float(v) for v in (7, 1, 20, 3, 5, 2, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19)]
    assert load._percentile(values, 0.0) == 1.0
    assert load._percentile(values, 0.5) == 11.0  # rank round(9.5) = 10 of ranks 0..19
    assert load._percentile(values, 0.95) == 19.0  # rank round(18.05) = 18
    assert load._percentile(values, 1.0) == 20.0
    assert load._percentile([4.0], 0.95) == 4.0


def test_same_texts_checks_every_repeat_of_a_prompt():
    reference = {"texts": {0: ["a"], 1: ["b"]}}
    assert load._same_texts({"texts": {0: ["a", "a"], 1: ["b"]}}, reference)
    assert not load._same_texts({"texts": {0: ["a", "x"], 1: ["b"]}}, reference)  # the second repeat differs


# ---- the llama-server peer, against a fake llama-server executable -----------------------------

FAKE_LLAMA_SERVER = '''
"""Stands in for llama.cpp's llama-server: records its argv and every request body next to the
model file, answers /health, and /v1/completions with the prompt's first max_tokens words in
upper case: streamed as OpenAI chunks with one token per chunk and no usage (as some builds do),
or as one body with usage and llama-server's timings."""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = sys.argv[1:]
opt = {args[i]: args[i + 1] for i in range(0, len(args) - 1) if args[i].startswith("-")}
with open(opt["-m"] + ".argv.json", "w") as f:
    json.dump(args, f)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status":"ok"}')

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(opt["-m"] + ".requests.jsonl", "a") as f:
            f.write(json.dumps(body) + "\\n")
        words = [w.upper() + " " for w in body["prompt"].split()[: body["max_tokens"]]]
        self.send_response(200)
        if not body.get("stream"):
            usage = {"completion_tokens": len(words)}
            timings = {"prompt_ms": 1.0, "predicted_ms": 2.0 * len(words)}
            reply = {"choices": [{"index": 0, "text": "".join(words)}], "usage": usage, "timings": timings}
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(reply).encode())
            return
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for word in words:
            chunk = {"choices": [{"index": 0, "text": word, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\\n\\n".encode())
        self.wfile.write(b"data: [DONE]\\n\\n")


ThreadingHTTPServer((opt["--host"], int(opt["--port"])), Handler).serve_forever()
'''


def fake_llama_server(folder: Path) -> tuple[Path, Path]:
    """(executable, GGUF) of a fake llama-server in `folder` (FAKE_LLAMA_SERVER); it writes its
    argv to `<gguf>.argv.json` and the request bodies to `<gguf>.requests.jsonl`."""
    exe = folder / "llama-server"
    exe.write_text(f"#!{sys.executable}\n{FAKE_LLAMA_SERVER}")
    exe.chmod(0o755)
    gguf = folder / "model.gguf"
    gguf.write_bytes(b"GGUF")
    return exe, gguf


def test_llama_server_peer_runs_the_binary_on_the_gguf_and_reads_its_stream(tmp_path):
    exe, gguf = fake_llama_server(tmp_path)
    prompts = ["one two three four five", "six seven"]
    rows = load._peer_llama_server(str(exe), gguf, prompts, [1, 2], max_tokens=3, requests_per_level=0)
    argv = json.loads((tmp_path / "model.gguf.argv.json").read_text())
    opt = dict(zip(argv[::2], argv[1::2], strict=True))
    assert opt["-m"] == str(gguf) and opt["--host"] == "127.0.0.1" and int(opt["--port"]) > 0
    assert opt["--parallel"] == "2"  # one slot per client of the top level
    assert int(opt["-c"]) >= 2 * (3 + 1024)  # every slot holds a prompt and the new tokens
    assert [r["concurrency"] for r in rows] == [1, 2] and [r["requests"] for r in rows] == [4, 8]
    assert rows[0]["texts"] == {0: ["ONE TWO THREE "] * 2, 1: ["SIX SEVEN "] * 2}
    assert all(r["aggregate_tokens_per_s"] > 0 for r in rows)


def test_tokens_fall_back_to_text_chunks_without_usage():
    import asyncio

    import httpx

    chunks = [{"choices": [{"text": t}]} for t in ("a", "", "b", "c")]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))

    async def go():
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:9") as client:
            return await load._one(client, "m", "p", 8)

    result = asyncio.run(go())
    assert result["tokens"] == 3 and result["text"] == "abc"


def _sse_completion(*texts: str) -> str:
    return "".join(f"data: {json.dumps({'choices': [{'text': t}]})}\n\n" for t in texts) + "data: [DONE]\n\n"


def test_a_request_dropped_before_any_answer_is_sent_again():
    # llama-server closes pooled connections idle for 5 s; a request racing that close gets no
    # answer at all (the peer run died on it). Nothing was generated, so the client resends once.
    import asyncio

    import httpx

    calls = []

    def handler(request):
        calls.append(request)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return httpx.Response(200, text=_sse_completion("a", "b"))

    async def go():
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:9") as client:
            return await load._one(client, "m", "p", 8)

    assert asyncio.run(go())["text"] == "ab" and len(calls) == 2


def test_a_request_dropped_twice_or_mid_stream_fails():
    # The resend is for a request the server never answered, once: a second drop, or a stream cut
    # after tokens arrived, is the server's failure and the level reports it.
    import asyncio

    import httpx

    class CutStream(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield _sse_completion("a").removesuffix("data: [DONE]\n\n").encode()
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    def always_dropped(request):
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    calls = []

    def cut_mid_stream(request):
        calls.append(request)
        return httpx.Response(200, stream=CutStream())

    async def go(handler):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://127.0.0.1:9") as client:
            return await load._one(client, "m", "p", 8)

    with pytest.raises(httpx.RemoteProtocolError):
        asyncio.run(go(always_dropped))
    with pytest.raises(httpx.RemoteProtocolError):
        asyncio.run(go(cut_mid_stream))
    assert len(calls) == 1


def test_peer_gguf_is_the_builtin_file_or_the_configs(tmp_path):
    from types import SimpleNamespace

    from bench.live_server import llama_server_gguf

    assert llama_server_gguf(SimpleNamespace(model=str(tmp_path / "x.gguf"))) == tmp_path / "x.gguf"
    with pytest.raises(SystemExit, match="needs a GGUF"):
        llama_server_gguf(SimpleNamespace(model="tiny-gemma3"))
