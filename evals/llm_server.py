"""A small OpenAI-compatible chat server over a saebench backend (standard library ``http.server``).

    python -m saebench.evals.llm_server --backend hf            # SmolLM2-135M-Instruct on 127.0.0.1:8000
    python -m saebench.evals.llm_server --backend keyword --port 0

Serves ``POST /v1/chat/completions`` (non-streaming; ``model``, ``messages``, ``max_tokens``,
``temperature``, ``seed``), ``GET /v1/models`` and ``GET /stats`` (requests served). It prints
``listening on http://HOST:PORT/v1`` once it accepts connections (``--port 0`` picks a free port).

It exists so that the HTTP client of :mod:`saebench.llm` is tested against a real server process, and
so that a local judge can be shared by several runs. Fault injection for those tests:
``--fail-first N`` answers the first N completion requests with ``--fail-status`` (default 503), and
``--delay S`` sleeps S seconds before every answer (to exercise client timeouts).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from saebench.evals.autointerp import make_backend
from saebench.llm import Backend


class _State:
    def __init__(self, backend: Backend, fail_first: int, fail_status: int, delay: float):
        self.backend = backend
        self.fail_left = fail_first
        self.fail_status = fail_status
        self.delay = delay
        self.requests = 0  # completion requests received (failed ones included)
        self.answered = 0
        self.lock = threading.Lock()


def make_handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: tests and users read stdout for the address only
            pass

        def _send(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": state.backend.model, "object": "model", "owned_by": "saebench"}]})
            elif self.path.rstrip("/") == "/stats":
                self._send(200, {"requests": state.requests, "answered": state.answered})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            try:
                n = int(self.headers.get("Content-Length") or 0)
                req = json.loads(self.rfile.read(n) or b"{}")
                messages = req["messages"]
            except (ValueError, KeyError, TypeError) as e:
                self._send(400, {"error": {"message": f"bad request: {e}", "type": "invalid_request_error"}})
                return
            with state.lock:
                state.requests += 1
                fail = state.fail_left > 0
                if fail:
                    state.fail_left -= 1
            if fail:
                self._send(state.fail_status, {"error": {"message": "injected failure (--fail-first)", "type": "server_error"}})
                return
            if state.delay:
                time.sleep(state.delay)
            try:
                r = state.backend.chat(messages, int(req.get("max_tokens") or 256), float(req.get("temperature") or 0.0), int(req.get("seed") or 0))
            except ValueError as e:
                self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
                return
            with state.lock:
                state.answered += 1
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": req.get("model") or state.backend.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "total_tokens": r.prompt_tokens + r.completion_tokens},
            })

    return Handler


def serve(backend: Backend, host: str = "127.0.0.1", port: int = 8000, fail_first: int = 0, fail_status: int = 503,
          delay: float = 0.0) -> ThreadingHTTPServer:
    """A started-but-not-serving server (call ``serve_forever``); ``server.server_address`` has the bound port."""
    server = ThreadingHTTPServer((host, port), make_handler(_State(backend, fail_first, fail_status, delay)))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m saebench.evals.llm_server", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", choices=["hf", "keyword"], default="hf", help="what answers: a local HF chat model, or the rule-based keyword judge")
    p.add_argument("--model", default=None, help="hf: a local folder or hub name (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fail-first", type=int, default=0, help="testing: answer the first N completion requests with --fail-status")
    p.add_argument("--fail-status", type=int, default=503)
    p.add_argument("--delay", type=float, default=0.0, help="testing: seconds to sleep before every answer")
    a = p.parse_args(argv)
    backend = make_backend(a.backend, a.model, device=a.device)
    server = serve(backend, a.host, a.port, a.fail_first, a.fail_status, a.delay)
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}/v1 (backend {backend.kind}, model {backend.model})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
