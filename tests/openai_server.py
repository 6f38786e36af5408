"""A real OpenAI-compatible HTTP server for tests: ``POST /v1/chat/completions`` with scripted behaviours.

:class:`FakeAzureOpenAI` is the same server speaking Azure OpenAI's dialect instead: it answers only
``POST /openai/deployments/<deployment>/chat/completions?api-version=<version>`` carrying the key in
an ``api-key`` header (404 for another URL, 401 for another key), so a test shows the real
``openai.AzureOpenAI`` client is pointed where Azure expects it.

It runs a ``ThreadingHTTPServer`` on 127.0.0.1 (a free port) in a thread, so the real ``openai``
client and our retry code talk HTTP to it. Behaviours queued with :meth:`FakeOpenAI.script` are
used by the next requests in order; once the queue is empty every request gets
:meth:`FakeOpenAI.default_answer`. Every request is logged (body, headers, the behaviour used).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from typing_extensions import Self


@dataclass
class Reply:
    """One scripted behaviour: an HTTP status (200 = an answer), optional headers, a delay, or a dropped connection."""

    status: int = 200
    text: str | None = None  # None: the default answer for this prompt
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False  # close the connection without answering
    usage: bool = True


def explanation_answer(prompt: str) -> str:
    return "Feature category: Low-level\nScore: 4\nExplanation: the feature fires on one word."


def detection_answer(prompt: str) -> str:
    """Picks exactly the excerpts that contain ``ACT`` (the fixtures mark activating contexts so)."""
    numbers = [line.split(".", 1)[0] for line in prompt.splitlines() if line[:1].isdigit() and "ACT" in line]
    return "Activating: " + (", ".join(numbers) or "none")


def default_answer(prompt: str) -> str:
    return detection_answer(prompt) if "Activating:" in prompt else explanation_answer(prompt)


class FakeOpenAI:
    def __init__(self, answer: Callable[[str], str] = default_answer) -> None:
        self.answer = answer
        self.queue: deque[Reply] = deque()
        self.log: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def script(self, *replies: Reply) -> None:
        with self.lock:
            self.queue.extend(replies)

    def prompts(self) -> list[str]:
        return [entry["prompt"] for entry in self.log]

    def refusal(self, handler: BaseHTTPRequestHandler) -> int | None:
        """The status that refuses this request's URL or credentials; None when it may be answered."""
        return None if handler.path == "/v1/chat/completions" else 404

    def handle(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        with self.lock:
            reply = self.queue.popleft() if self.queue else Reply()
            prompt = "\n".join(m["content"] for m in body["messages"])
            entry = {"path": handler.path, "body": body, "prompt": prompt, "status": reply.status, "drop": reply.drop,
                     "authorization": handler.headers.get("Authorization"), "api_key": handler.headers.get("api-key"),
                     "usage": None}
            self.log.append(entry)
        if reply.delay:
            time.sleep(reply.delay)
        if reply.drop:
            handler.close_connection = True
            handler.connection.close()
            return
        refused = self.refusal(handler)
        if refused is not None:
            reply = Reply(status=refused)
            entry["status"] = refused
        if reply.status != 200:
            payload = {"error": {"message": f"scripted HTTP {reply.status}", "type": "test"}}
        else:
            text = reply.text if reply.text is not None else self.answer(prompt)
            payload = {
                "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            }
            if reply.usage:
                payload["usage"] = {"prompt_tokens": len(prompt.encode()) // 4, "completion_tokens": len(text.split()),
                                    "total_tokens": len(prompt.encode()) // 4 + len(text.split())}
            entry["usage"] = payload.get("usage")
        data = json.dumps(payload).encode()
        try:
            handler.send_response(reply.status)
            for key, value in reply.headers.items():
                handler.send_header(key, value)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass


class FakeAzureOpenAI(FakeOpenAI):
    """The server as an Azure OpenAI resource holding one chat ``deployment`` at one ``api_version``, keyed ``key``."""

    def __init__(
        self,
        deployment: str = "explainer",
        api_version: str = "2024-10-21",
        key: str = "azure-test-SECRET-41c8e2",
        answer: Callable[[str], str] = default_answer,
    ) -> None:
        super().__init__(answer)
        self.deployment, self.api_version, self.key = deployment, api_version, key

    @property
    def endpoint(self) -> str:
        """What ``--azure-endpoint`` takes: the resource's address alone."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def refusal(self, handler: BaseHTTPRequestHandler) -> int | None:
        url = urllib.parse.urlsplit(handler.path)
        if url.path != f"/openai/deployments/{self.deployment}/chat/completions":
            return 404
        if urllib.parse.parse_qs(url.query) != {"api-version": [self.api_version]}:
            return 404
        return None if handler.headers.get("api-key") == self.key else 401
