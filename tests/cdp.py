"""A minimal Chrome DevTools Protocol client for tests: start headless Chromium, drive one page over its
websocket (the `websockets` sync client), collect the events a test asserts on, stop the browser.

    with Browser.start(binary, tmp_path) as page:
        page.open(path.as_uri())
        page.evaluate("document.title")
        page.screenshot(tmp_path / "shot.png")
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.sync.client import ClientConnection, connect

__all__ = ["BROWSERS", "Browser", "CdpError", "find_browser"]

log = logging.getLogger(__name__)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
STARTUP_S = 60.0


class CdpError(RuntimeError):
    """The browser did not start, or answered a command with an error."""


def find_browser() -> str | None:
    """The first Chromium-family binary on PATH (None: a browser test skips)."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Browser:
    """One headless browser process and a CDP session on its first page."""

    proc: subprocess.Popen[bytes]
    ws: ClientConnection
    profile: Path
    stack: contextlib.ExitStack
    events: list[dict[str, Any]] = field(default_factory=list)
    _next_id: int = 0

    @classmethod
    def start(cls, binary: str, workdir: Path, width: int = 1366, height: int = 900) -> "Browser":
        """Launch `binary` headless with its own profile in `workdir` and attach to its page."""
        workdir.mkdir(parents=True, exist_ok=True)
        profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=workdir))  # fresh: no stale port file
        errlog = open(profile / "chromium.log", "wb")  # noqa: SIM115 - the process keeps writing to it
        proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=errlog, start_new_session=True)
        errlog.close()
        stack = contextlib.ExitStack()
        try:
            port = cls._port(proc, profile)
            ws = stack.enter_context(connect(cls._page_url(port), max_size=None, open_timeout=30))
        except BaseException:
            stack.close()
            _stop(proc)
            raise
        return cls(proc, ws, profile, stack)

    @staticmethod
    def _port(proc: subprocess.Popen[bytes], profile: Path) -> int:
        marker = profile / "DevToolsActivePort"
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (profile / "chromium.log").read_text(errors="replace")[-2000:]
                raise CdpError(f"chromium exited with code {proc.returncode}: {tail}")
            if marker.is_file():
                first = marker.read_text().splitlines()[:1]
                if first and first[0].strip().isdigit():
                    return int(first[0])
            time.sleep(0.05)
        raise CdpError(f"chromium wrote no {marker} within {STARTUP_S:.0f} s")

    @staticmethod
    def _page_url(port: int) -> str:
        deadline = time.monotonic() + STARTUP_S
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10) as r:  # noqa: S310 - local
                targets = json.loads(r.read())
            pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            if time.monotonic() > deadline:
                raise CdpError(f"no page target on port {port}: {targets}")
            time.sleep(0.1)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.stack.close()  # closes the websocket
        finally:
            _stop(self.proc)

    # ---- protocol ----

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
        """Send one command and wait for its answer; events that arrive meanwhile are kept in `events`."""
        self._next_id += 1
        ident = self._next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(deadline, method)
            if msg.get("id") == ident:
                if "error" in msg:
                    raise CdpError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def _recv(self, deadline: float, what: str) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CdpError(f"no answer to {what} in time")
        try:
            return json.loads(self.ws.recv(timeout=left))
        except TimeoutError:
            raise CdpError(f"no answer to {what} in time") from None

    def wait_event(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        """The first event `method` (already received or next to arrive)."""
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(deadline, method)
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return msg

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        """The value of a JavaScript expression in the page (an exception there is a CdpError)."""
        got = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": await_promise})
        if "exceptionDetails" in got:
            raise CdpError(f"page script failed: {got['exceptionDetails']}")
        return got.get("result", {}).get("value")

    # ---- page ----

    def open(self, url: str, width: int = 1366, height: int = 900) -> None:
        """Enable the domains whose events a test reads, load `url`, and wait for every image to decode."""
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})
        self.events.clear()
        got = self.send("Page.navigate", {"url": url})
        if got.get("errorText"):
            raise CdpError(f"navigation to {url} failed: {got['errorText']}")
        self.wait_event("Page.loadEventFired")
        self.evaluate("Promise.all([...document.images].map(i => i.decode().catch(() => null)))",
                      await_promise=True)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        out = []
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(f"console.error: {[a.get('value', a.get('description')) for a in p.get('args', [])]}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} ({p['entry'].get('url', '')})")
        return out

    def requests(self) -> list[str]:
        """The URLs the page requested (file: and data: ones included)."""
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """A PNG of the first screen (or the whole page)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": size[0], "height": size[1],
                                                             "scale": 1})
        data = self.send("Page.captureScreenshot", params)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def print_pdf(self) -> bytes:
        return base64.b64decode(self.send("Page.printToPDF", {"printBackground": False}, timeout=120)["data"])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the browser this module started, then its own process group (renderers it spawned)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the group created by start_new_session: only this browser's
    except (ProcessLookupError, PermissionError):
        pass
