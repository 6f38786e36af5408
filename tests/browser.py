"""Headless Chromium for tests, driven over the DevTools protocol with no Python dependency.

``--dump-dom`` alone cannot tell whether a page logged errors, tried to fetch something or ran an
injected handler, so the tests talk to the browser instead: ``--remote-debugging-pipe`` makes
Chromium read JSON commands on fd 3 and write replies and events on fd 4, each terminated by a NUL
byte. That is all a test needs to open a page, wait for its load event, collect console errors,
exceptions and requests, and query the live DOM with JavaScript.

    with Browser.start() as browser:
        page = browser.open(path)
        assert not page.errors
        assert page.evaluate("document.title") == "..."
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
INSTALL_HINT = (
    "Chromium is not installed: `apt-get install chromium` on Debian (`make test` installs it), or set "
    "ROUTESAE_CHROMIUM to a Chrome/Chromium executable"
)
FLAGS = (
    "--headless",
    "--disable-gpu",
    "--no-sandbox",  # root in containers and CI cannot use the setuid sandbox
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
)
# Re-plumbs two pipe ends onto fds 3 and 4 before exec: Popen cannot place inherited fds at fixed numbers.
TRAMPOLINE = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execv(sys.argv[3], sys.argv[3:])"


def find_chromium() -> str | None:
    """``$ROUTESAE_CHROMIUM`` or the first Chromium/Chrome on ``PATH``."""
    explicit = os.environ.get("ROUTESAE_CHROMIUM")
    if explicit:
        return explicit
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


class BrowserError(RuntimeError):
    pass


@dataclass
class Page:
    """One loaded tab: what it reported while loading, and a way to ask its DOM questions."""

    browser: Browser
    session: str
    url: str
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, log errors, failed loads
    console: list[str] = field(default_factory=list)  # every console message, for failure messages
    requests: list[str] = field(default_factory=list)  # every URL the page asked for (itself included)

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page and return its JSON value; a thrown error is a BrowserError."""
        reply = self.browser.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, self.session
        )
        if "exceptionDetails" in reply:
            raise BrowserError(f"{expression!r} threw: {_exception_text(reply['exceptionDetails'])}")
        self.collect()
        return reply["result"].get("value")

    def collect(self) -> None:
        """Move this page's pending events into ``errors``/``console``/``requests``."""
        for event in self.browser.take_events(self.session):
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                self.errors.append(f"exception: {_exception_text(params['exceptionDetails'])}")
            elif method == "Runtime.consoleAPICalled":
                text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
                self.console.append(f"{params['type']}: {text}")
                if params["type"] in ("error", "assert"):
                    self.errors.append(f"console.{params['type']}: {text}")
            elif method == "Log.entryAdded":
                entry = params["entry"]
                self.console.append(f"{entry['level']} ({entry['source']}): {entry['text']}")
                if entry["level"] == "error":
                    self.errors.append(f"log ({entry['source']}): {entry['text']} {entry.get('url', '')}".strip())
            elif method == "Network.requestWillBeSent":
                self.requests.append(params["request"]["url"])
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                self.errors.append(f"load failed: {params.get('errorText')} ({params.get('blockedReason') or params.get('type')})")


def _exception_text(details: dict[str, Any]) -> str:
    exception = details.get("exception", {})
    return str(exception.get("description") or details.get("text"))


class Browser:
    """A headless Chromium process and its DevTools pipe."""

    def __init__(self, executable: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.profile = tempfile.TemporaryDirectory(prefix="routesae-chromium-")
        self.log = Path(self.profile.name) / "stderr.log"
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        argv = [executable, *FLAGS, f"--user-data-dir={self.profile.name}/profile", "about:blank"]
        with open(self.log, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-c", TRAMPOLINE, str(to_chrome_r), str(from_chrome_w), *argv],
                pass_fds=(to_chrome_r, from_chrome_w),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.next_id = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        self.version = self.call("Browser.getVersion")["product"]

    @classmethod
    def start(cls, executable: str | None = None, timeout: float = 30.0) -> Browser:
        executable = executable or find_chromium()
        if executable is None:
            raise BrowserError(INSTALL_HINT)
        return cls(executable, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._from_chrome, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for message in messages:
                    self.messages.put(json.loads(message))
        self.messages.put(None)  # the browser went away

    def _stderr_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def _next(self, deadline: float) -> dict[str, Any]:
        try:
            message = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise BrowserError(f"Chromium did not answer within {self.timeout} s; its stderr:\n{self._stderr_tail()}") from None
        if message is None:
            self.messages.put(None)
            raise BrowserError(f"Chromium exited ({self.process.poll()}); its stderr:\n{self._stderr_tail()}")
        return message

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and wait for its reply; events that arrive meanwhile are kept for the pages."""
        with self.lock:
            self.next_id += 1
            message_id = self.next_id
            message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
            if session:
                message["sessionId"] = session
            os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
            deadline = time.monotonic() + self.timeout
            while True:
                reply = self._next(deadline)
                if reply.get("id") != message_id:
                    self.events.append(reply)
                    continue
                if "error" in reply:
                    raise BrowserError(f"{method} failed: {reply['error'].get('message')}")
                return reply.get("result", {})

    def take_events(self, session: str) -> list[dict[str, Any]]:
        with self.lock:
            mine = [e for e in self.events if e.get("sessionId") == session]
            self.events = [e for e in self.events if e.get("sessionId") != session]
        return mine

    def _wait_event(self, method: str, session: str) -> None:
        deadline = time.monotonic() + self.timeout
        with self.lock:
            if any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
                return
            while True:
                event = self._next(deadline)
                self.events.append(event)
                if event.get("method") == method and event.get("sessionId") == session:
                    return

    def open(self, path_or_url: Path | str) -> Page:
        """Open a file or URL in a new tab and wait for its load event."""
        url = Path(path_or_url).resolve().as_uri() if isinstance(path_or_url, Path) else path_or_url
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session)
        navigation = self.call("Page.navigate", {"url": url}, session)
        if navigation.get("errorText"):
            raise BrowserError(f"cannot open {url}: {navigation['errorText']}")
        self._wait_event("Page.loadEventFired", session)
        page = Page(self, session, url)
        page.evaluate("0")  # one round trip: every event sent before it has now arrived
        return page

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.call("Browser.close")
            except BrowserError:
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.close(self._to_chrome)
        self.profile.cleanup()
