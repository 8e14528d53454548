"""An unexpected exception inside the app (a bug, not bad input): a 500 with a generic message and a request id,
the details only in the log, and the keep-alive connection kept. The real app and uvicorn (the same protocol and
pre-bound socket as `minke serve`) in a thread on loopback, over the embedded default model; a route that
raises is added to the app for the test, since no client input may reach such an error."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
import uvicorn

from minke.engine.async_llm import AsyncLLM
from minke.server.app import build_app
from minke.server.http import PreboundServer, bind_socket, header_timeout_protocol
from minke.server.limits import HTTPLimits

from test_server_hostile import _read_response

SECRET = "/very/private/checkpoint/path"


@pytest.fixture(scope="module")
def served():
    engine = AsyncLLM(None, device="cpu", kv_cache_tokens=2048)
    app = build_app(engine, "m", log_stats_interval=None)

    @app.get("/boom")
    async def boom():
        raise RuntimeError(f"cannot open {SECRET}")

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", http=header_timeout_protocol(HTTPLimits.timeout_header_s))
    server = PreboundServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(20)
    sock.close()


def test_internal_error_is_generic_500_and_keeps_the_connection(served, caplog):
    with caplog.at_level(logging.ERROR, logger="minke.server"):
        with socket.create_connection(("127.0.0.1", served), timeout=30) as s:
            for _ in range(2):  # twice on one connection: it survives the 500
                s.sendall(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
                status, headers, body = _read_response(s)
                assert status == 500 and headers.get("connection", "").lower() != "close"
                err = json.loads(body)["error"]
                assert err["type"] == "server_error"
                assert SECRET not in err["message"] and "RuntimeError" not in err["message"]
                rid = headers["x-request-id"]
                assert f"request id {rid}" in err["message"]
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(s)[0] == 200
    assert SECRET in caplog.text and rid in caplog.text  # the details are in the log, under the id
