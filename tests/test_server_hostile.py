"""`minke serve` under hostile input (issue 24): every request below gets its 4xx / 413 / 408 in OpenAI's error
shape, and the server keeps serving (/health answers, keep-alive connections survive a 400, innocent streams
running beside a poisoned request finish). The real server in a subprocess on loopback, the embedded default
model on CPU, short limits so that the timeouts are quick to see."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from test_server import _free_port, launch_server, stop_server

API_KEY = "sk-hostile"
MODEL = "tiny-default"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY_LIMIT = 1024 * 1024
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
CONCURRENCY = 48


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("hostile") / "serve.log"
    proc, base = launch_server(["--device", "cpu", "--kv-cache-tokens", "8192", "--served-model-name", MODEL,
                                "--api-key", API_KEY, "--max-request-body-bytes", str(BODY_LIMIT),
                                "--timeout-header", str(HEADER_TIMEOUT), "--timeout-body", str(BODY_TIMEOUT),
                                "--limit-concurrency", str(CONCURRENCY), "--disable-log-stats"], log)
    yield {"base": base, "port": int(base.rsplit(":", 1)[1]), "log": log, "proc": proc}
    stop_server(proc)


@pytest.fixture(scope="module")
def h(server):
    with httpx.Client(base_url=server["base"], headers=AUTH, timeout=30) as c:
        yield c


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _healthy(base: str, within: float = 1.0) -> None:
    t = time.monotonic()
    r = httpx.get(f"{base}/health", timeout=within + 5)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert time.monotonic() - t < within, f"/health took {time.monotonic() - t:.2f} s"


def _request(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response (Content-Length framed) from `sock`."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {buf!r}"
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    n = int(headers.get("content-length", 0))
    while len(rest) < n:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:n]


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True  # EOF: the server closed it
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


# ----------------------------------------------------------------------------------------------- JSON


DEEP = b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}"


def test_deep_json_and_lone_surrogates_are_400s_and_keep_alive(server):
    cases = [
        ("/tokenize", DEEP, None),
        ("/v1/completions", DEEP, None),
        ("/tokenize", b'{"prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", b'{"model": "\\ud800", "prompt": "hi"}', "model"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\udfffy"}]}', "messages.0.content"),
        ("/detokenize", b'{"tokens": [1], "\\udc00": 1}', "\\udc00"),
        ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', None),
        ("/v1/completions", b'{"prompt": "hi", "temperature": 1e400}', None),
    ]
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as s:
        for path, body, param in cases:
            s.sendall(_request(path, body))
            status, headers, payload = _read_response(s)
            assert status == 400, (path, body[:60], payload)
            err = json.loads(payload)["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == param, err
            assert headers.get("connection", "").lower() != "close"
        # Same connection, still served.
        s.sendall(f"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, payload = _read_response(s)
        assert status == 200 and headers["content-type"] == "application/json" and json.loads(payload)
    _healthy(server["base"])


def test_strict_types_and_sampling_bounds(h):
    base = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for extra, param in [({"echo": 0}, "echo"), ({"stream": "true"}, "stream"), ({"temperature": "0.5"}, "temperature"),
                         ({"top_k": 2**63}, "top_k"), ({"max_tokens": 2**64}, "max_tokens"),
                         ({"repetition_penalty": 1e-50}, "repetition_penalty"),
                         ({"repetition_penalty": 1e50}, "repetition_penalty"),
                         ({"stop_token_ids": [10**7], "min_tokens": 1}, "stop_token_ids"),
                         ({"prompt": [1, 2**64]}, "prompt"), ({"stop": ["a"] * 65}, "stop")]:
        err = _error(h.post("/v1/completions", json={**base, **extra}), 400)
        assert err["param"] is not None and err["param"].split(".")[0] == param, (extra, err)
    err = _error(h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                      "logprobs": 1}), 400)
    assert err["param"] == "logprobs"
    # "default" names the served model (SGLang's client snippets send it).
    r = h.post("/v1/completions", json={**base, "model": "default"})
    assert r.status_code == 200 and r.json()["model"] == MODEL


def test_logit_bias_is_clamped_not_overflowed(h):
    # 1e39 overflows float32 to inf (softmax NaN: garbage token 0); clamped to +100 it forces token 300.
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "logprobs": 0,
            "logit_bias": {"300": 1e39}, "return_tokens_as_token_ids": True, "ignore_eos": True}
    r = h.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"]["tokens"] == ["token_id:300"] * 6
    # A ban on token 300 by a huge negative bias: never sampled.
    body.update(logit_bias={"300": -1e39}, max_tokens=8)
    r = h.post("/v1/completions", json=body)
    assert "token_id:300" not in r.json()["choices"][0]["logprobs"]["tokens"]


# ----------------------------------------------------------------------------------------------- size and time


def test_body_limit_is_413(server, h):
    err = _error(h.post("/tokenize", content=b"x" * (BODY_LIMIT + 1)), 413)
    assert str(BODY_LIMIT) in err["message"]

    def chunks():  # no Content-Length: the limit is counted as the bytes come
        for _ in range(BODY_LIMIT // 65536 + 2):
            yield b"x" * 65536

    _error(h.post("/v1/completions", content=chunks()), 413)
    _healthy(server["base"])


def test_large_bodies_do_not_block_the_event_loop(server, h):
    # Under the body limit, but longer than any prompt that fits: refused before tokenizing.
    err = _error(h.post("/v1/completions", json={"prompt": "word " * 190_000, "max_tokens": 1}), 400)
    assert err["code"] == "context_length_exceeded" and "characters" in err["message"]
    _error(h.post("/tokenize", json={"prompt": "word " * 190_000}), 400)
    # A big body that is parsed and decoded in a worker thread while /health is asked repeatedly.
    ids = [17] * 120_000  # ~840 kB of JSON
    done = {}

    def big():
        done["r"] = httpx.post(f"{server['base']}/detokenize", json={"tokens": ids}, headers=AUTH, timeout=60)

    t = threading.Thread(target=big)
    t.start()
    while t.is_alive():
        _healthy(server["base"], within=1.0)
        time.sleep(0.05)
    t.join()
    assert done["r"].status_code == 200 and done["r"].json()["prompt"]


def test_slow_body_is_408_and_closed(server):
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as s:
        body = b'{"prompt": "' + b"a" * 40 + b'"}'
        s.sendall(_request("/tokenize", b"")[:-2].replace(b"Content-Length: 0", f"Content-Length: {len(body)}".encode())
                  + b"\r\n")
        start = time.monotonic()
        status = None
        for byte in body[:-1]:  # one byte every 0.2 s: would take 8 s
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            s.settimeout(0.2)
            try:
                status, headers, _ = _read_response(s)
                break
            except TimeoutError:
                continue
        assert status == 408 and headers.get("connection") == "close"
        assert time.monotonic() - start < BODY_TIMEOUT + 2
    _healthy(server["base"])


def test_half_open_and_slow_header_connections_are_closed(server):
    idle = [socket.create_connection(("127.0.0.1", server["port"])) for _ in range(40)]
    dribble = socket.create_connection(("127.0.0.1", server["port"]))
    try:
        _healthy(server["base"])  # the server answers with 40 idle sockets open
        start = time.monotonic()
        for ch in b"GET /health HTTP/1.1\r\nHos":  # a request head one byte at a time
            try:
                dribble.sendall(bytes([ch]))
            except OSError:
                break
            time.sleep(0.1)
        assert _closed_within(dribble, HEADER_TIMEOUT + 3)
        assert time.monotonic() - start < HEADER_TIMEOUT + 4
        assert all(_closed_within(s, HEADER_TIMEOUT + 3) for s in idle)
    finally:
        for s in idle + [dribble]:
            s.close()
    _healthy(server["base"])


def test_connection_limit_then_recovery(server):
    # CONCURRENCY idle connections fill the limit: a new request is refused with 503 instead of queueing.
    idle = [socket.create_connection(("127.0.0.1", server["port"])) for _ in range(CONCURRENCY)]
    try:
        time.sleep(0.3)  # accepted by the server
        assert httpx.get(f"{server['base']}/health", timeout=5).status_code == 503
        # The header timeout frees them; then the server serves again.
        assert all(_closed_within(s, HEADER_TIMEOUT + 3) for s in idle)
    finally:
        for s in idle:
            s.close()
    _healthy(server["base"])


# ----------------------------------------------------------------------------------------------- surface


def test_surface_details(server, h):
    base = server["base"]
    cards = h.get("/v1/models").json()["data"]
    assert [c["id"] for c in cards] == [MODEL] and cards[0]["root"] == MODEL
    assert "/" not in json.dumps(cards)  # no filesystem path
    r = httpx.put(f"{base}/v1/completions", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    _error(r, 405)
    r = httpx.get(f"{base}/health")
    assert r.headers["content-type"] == "application/json"
    doc = httpx.get(f"{base}/openapi.json").json()
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "echo", "logit_bias", "top_k"} <= set(props)
    assert doc["paths"]["/tokenize"]["post"]["security"] == [{"bearer": []}]


# ----------------------------------------------------------------------------------------------- neighbours


POISON = [
    ("/v1/completions", {"prompt": "x", "logit_bias": {"300": 1e39}, "max_tokens": 4}),
    ("/v1/completions", {"prompt": "x", "top_k": 2**63, "max_tokens": 4}),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**9], "min_tokens": 2, "max_tokens": 4}),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 1e-50, "max_tokens": 4}),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): -1e39 for i in range(4096)}, "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}),
    ("/v1/completions", {"prompt": [5, 2**63]}),
]


def test_poisoned_requests_leave_innocent_streams_alone(server):
    async def innocent(c: httpx.AsyncClient, i: int) -> tuple[int, str | None]:
        body = {"model": MODEL, "prompt": f"Story {i}:", "max_tokens": 24, "stream": True, "ignore_eos": True,
                "temperature": 0, "stream_options": {"include_usage": True}}
        usage, reason = None, None
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    if chunk.get("usage") and not chunk["choices"]:
                        usage = chunk["usage"]["completion_tokens"]
                    for ch in chunk["choices"]:
                        reason = ch["finish_reason"] or reason
        return usage, reason

    async def poison(c: httpx.AsyncClient) -> list[int]:
        await asyncio.sleep(0.3)  # the innocent streams are running
        codes = []
        for path, body in POISON:
            raw = json.dumps(body).encode()  # json.dumps keeps a lone surrogate as "\\ud800"
            codes.append((await c.post(path, content=raw, headers={"Content-Type": "application/json"})).status_code)
        return codes

    async def main():
        async with httpx.AsyncClient(base_url=server["base"], headers=AUTH, timeout=120) as c:
            return await asyncio.gather(*(innocent(c, i) for i in range(6)), poison(c))

    *streams, codes = asyncio.run(main())
    assert streams == [(24, "length")] * 6
    assert codes == [200, 400, 400, 400, 200, 400, 400]
    _healthy(server["base"])


# ----------------------------------------------------------------------------------------------- start-up


def test_port_in_use_fails_before_loading_the_model():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "minke.cli", "serve", "--device", "cpu", "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert f"cannot bind 127.0.0.1:{port}" in r.stderr
    assert "KV cache capacity" not in r.stderr + r.stdout  # it never loaded the model
    assert time.monotonic() - start < 60


def test_serve_without_the_serve_extras_says_what_to_install():
    code = ("import sys; sys.modules['uvicorn'] = None\n"
            "from minke.cli import main\nsys.exit(main(['serve', '--port', '%d']))" % _free_port())
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "pip install 'minke[serve]'" in r.stderr and "uvicorn" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("flag,value", [("--timeout-body", "0"), ("--max-request-body-bytes", "10"),
                                        ("--limit-concurrency", "0")])
def test_bad_limit_flags_are_one_line_errors(flag, value):
    r = subprocess.run([sys.executable, "-m", "minke.cli", "serve", "--device", "cpu", "--port", str(_free_port()),
                        flag, value], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"minke serve: error: {flag} must be" in r.stderr and "Traceback" not in r.stderr
