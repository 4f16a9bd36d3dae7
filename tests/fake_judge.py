"""A scripted OpenAI-compatible chat-completions server for the GRPO judge's tests.

A real HTTP server (`http.server.ThreadingHTTPServer` on 127.0.0.1, in a daemon
thread), so `adapters.rewards.JudgeReward` runs its real `openai` client, retries and
reply parsing against it. The judge's quality is not under test (a real judge model is
far too slow for the test suite), so the replies are scripted: `reply(body, n)` gets
the request body and its 0-based number and returns ``(status, content)``, where
content is the message text of a 200 answer (or an error message otherwise).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = Callable[[dict[str, Any], int], tuple[int, str]]


def completion(content: str) -> dict[str, Any]:
    """A minimal chat completion whose message is `content`."""
    return {
        "id": "chatcmpl-judge",
        "object": "chat.completion",
        "created": 0,
        "model": "judge",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }


class FakeJudge:
    """The running server: `url` (an API root ending in /v1) and the `requests` seen."""

    def __init__(self, reply: Reply, models: tuple[str, ...] = ("judge",)) -> None:
        self.reply = reply
        self.models = models
        """What ``GET /v1/models`` lists (the judge's pre-flight check reads it)."""
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    status = 200
                    listed = [{"id": name, "object": "model"} for name in judge.models]
                    payload: dict[str, Any] = {"object": "list", "data": listed}
                else:
                    status, payload = 404, {"error": {"message": "no such route"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                with judge._lock:
                    number = len(judge.requests)
                    judge.requests.append(body)
                payload: dict[str, Any]
                if self.path != "/v1/chat/completions":
                    status, payload = 404, {"error": {"message": "no such route"}}
                else:
                    status, content = judge.reply(body, number)
                    payload = (
                        completion(content)
                        if status == 200
                        else {"error": {"message": content, "type": "test", "code": status}}
                    )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@contextmanager
def fake_judge(reply: Reply, models: tuple[str, ...] = ("judge",)) -> Iterator[FakeJudge]:
    """Run a `FakeJudge` for the duration of the block."""
    judge = FakeJudge(reply, models)
    judge.start()
    try:
        yield judge
    finally:
        judge.stop()
