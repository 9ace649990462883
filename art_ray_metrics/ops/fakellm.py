"""A local fake of the OpenAI and Anthropic HTTP APIs, for the demo (no network, no keys).

:class:`FakeLLMServer` serves, on ``127.0.0.1`` and a free port, in a daemon thread:

==============================  ==========================================================
``POST /v1/chat/completions``   an OpenAI ``chat.completion`` (non-streaming)
``POST /v1/messages``           an Anthropic ``message`` (non-streaming)
==============================  ==========================================================

The real ``openai.OpenAI`` and ``anthropic.Anthropic`` clients talk to it over HTTP
(``base_url=server.openai_base_url`` / ``server.anthropic_base_url``, ``api_key="demo"``), so
``track_api_cost`` prices genuine SDK response objects, cached-token usage included.

Determinism (the demo's ``--chaos`` reference relies on it): every response field is a pure
function of the request body. The response id is derived from a hash of the body, so a retried
request gets the same id (and is priced once), while two different prompts get different ids.
Token counts and the judge's score come from the same hash (a ``quality=<q>`` hint in the
prompt centres the score on ``q``, so the demo's reward can improve over training). Usage conventions follow the
providers: OpenAI ``prompt_tokens`` include ``prompt_tokens_details.cached_tokens``; Anthropic
``input_tokens`` exclude ``cache_creation_input_tokens`` and ``cache_read_input_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["FakeLLMServer", "fake_anthropic_message", "fake_chat_completion", "score_from_text"]


def _numbers(body: bytes) -> list[int]:
    """Eight deterministic 32-bit numbers from a request body."""
    h = hashlib.sha256(body).digest()
    return [int.from_bytes(h[i : i + 4], "big") for i in range(0, 32, 4)]


_QUALITY = re.compile(rb"quality=([0-9]+(?:\.[0-9]+)?)")


def _score(n: int, body: bytes) -> float:
    """A score in [0, 1]: the ``quality=<q>`` hint of the prompt, if any, plus hash noise."""
    noise = (n % 1000) / 1000
    match = _QUALITY.search(body)
    if match is None:
        return round(noise, 3)
    quality = float(match.group(1))
    return round(min(1.0, max(0.0, quality + 0.3 * (noise - 0.5))), 3)


def score_from_text(text: str) -> float:
    """Parse the ``score=<float>`` a fake judge answers with.

    >>> score_from_text("verdict: score=0.25")
    0.25
    """
    _, _, tail = text.partition("score=")
    return float(tail.split()[0]) if tail else 0.0


def fake_chat_completion(body: bytes) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` JSON the server answers ``body`` with.

    >>> r = fake_chat_completion(b'{"model": "gpt-4.1-mini", "messages": []}')
    >>> u = r["usage"]; u["prompt_tokens"] >= u["prompt_tokens_details"]["cached_tokens"]
    True
    """
    req = json.loads(body or b"{}")
    n = _numbers(body)
    prompt = 400 + n[0] % 1600
    cached = (prompt * (n[1] % 80)) // 100
    completion = 20 + n[2] % 180
    return {
        "id": "chatcmpl-" + hashlib.sha256(body).hexdigest()[:24],
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": str(req.get("model", "unknown")),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"verdict: score={_score(n[3], body)}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


def fake_anthropic_message(body: bytes) -> dict[str, Any]:
    """The Anthropic ``message`` JSON the server answers ``body`` with.

    >>> m = fake_anthropic_message(b'{"model": "claude-sonnet-4-6", "messages": []}')
    >>> m["type"], m["id"].startswith("msg_")
    ('message', True)
    """
    req = json.loads(body or b"{}")
    n = _numbers(body)
    return {
        "id": "msg_" + hashlib.sha256(body).hexdigest()[:24],
        "type": "message",
        "role": "assistant",
        "model": str(req.get("model", "unknown")),
        "content": [{"type": "text", "text": f"style: score={_score(n[4], body)}"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 50 + n[5] % 400,
            "output_tokens": 10 + n[6] % 120,
            "cache_creation_input_tokens": (n[7] % 3) * 512,
            "cache_read_input_tokens": 1024 + n[0] % 2048,
        },
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the SDKs reuse connections
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path.endswith("/chat/completions"):
            payload, status = fake_chat_completion(body), 200
        elif path.endswith("/messages"):
            payload, status = fake_anthropic_message(body), 200
        else:
            payload = {"error": {"type": "not_found", "message": f"no route {path!r}"}}
            status = 404
        if json.loads(body or b"{}").get("stream"):
            payload = {"error": {"type": "invalid_request", "message": "streaming not faked"}}
            status = 400
        data = json.dumps(payload).encode()
        with self.server.lock:
            self.server.requests += 1
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: the demo prints its own progress


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.lock = threading.Lock()
        self.requests = 0


class FakeLLMServer:
    """The fake API server; use as a context manager or call :meth:`start`/:meth:`stop`.

    ``port`` 0 (the default) takes a free port; ``art-ray-metrics fake-llm`` serves one from
    the command line.
    """

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeLLMServer:
        """Bind 127.0.0.1 on the port (a free one for 0) and serve in a daemon thread."""
        if self._server is None:
            self._server = _Server(self._port)
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="fake-llm-api", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            raise RuntimeError("Expected a started FakeLLMServer but got a stopped one")
        return int(self._server.server_address[1])

    @property
    def openai_base_url(self) -> str:
        """``base_url`` for ``openai.OpenAI``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """``base_url`` for ``anthropic.Anthropic``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> int:
        """Requests served so far."""
        return self._server.requests if self._server is not None else 0

    def export_lines(self) -> list[str]:
        """The shell lines that point the OpenAI and Anthropic SDKs at this server.

        A key already in the environment is kept (the server ignores it; it never leaves this
        machine); otherwise a placeholder satisfies the SDKs, which refuse to start without one.
        """
        return [
            f"export OPENAI_BASE_URL={self.openai_base_url}"
            " OPENAI_API_KEY=${OPENAI_API_KEY:-fake-llm}",
            f"export ANTHROPIC_BASE_URL={self.anthropic_base_url}"
            " ANTHROPIC_API_KEY=${ANTHROPIC_API_KEY:-fake-llm}",
        ]

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
