"""A small Chrome DevTools Protocol client for tests: the real headless Chromium, driven over
its websocket (websocket-client), collecting console errors and uncaught exceptions."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
)


class Browser:
    """``with Browser() as b: b.navigate(url); b.evaluate("1 + 1")``; ``b.problems`` lists the
    console errors, failed loads and exceptions seen since the last navigation."""

    def __init__(self, executable: Path = CHROMIUM, timeout: float = 30.0) -> None:
        if not executable.exists():
            raise FileNotFoundError(
                f"{executable} is missing: the browser tests need Chromium; `make test` installs "
                "it (apt-get install chromium)"
            )
        self.executable, self.timeout = executable, timeout
        self.problems: list[str] = []
        self._events: list[dict] = []
        self._ids = itertools.count(1)

    def __enter__(self) -> Browser:
        self._profile = Path(tempfile.mkdtemp(prefix="crp-chromium-"))
        self._process = subprocess.Popen(
            [str(self.executable), *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port = self._port()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.load(r) if t["type"] == "page"]
            self._ws = websocket.create_connection(
                pages[0]["webSocketDebuggerUrl"], timeout=self.timeout, suppress_origin=True
            )
            for domain in ("Runtime", "Log", "Page"):
                self.send(f"{domain}.enable")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if getattr(self, "_ws", None) is not None:
            self._ws.close()
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _port(self) -> int:
        """The debugging port Chromium chose, from DevToolsActivePort in its profile."""
        marker = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Chromium exited with code {self._process.returncode}")
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.05)
        raise TimeoutError(f"Chromium wrote no {marker.name} within {self.timeout} s")

    def send(self, method: str, **params: Any) -> dict:
        """Call a protocol method and return its result; events that arrive meanwhile are
        recorded."""
        call = next(self._ids)
        self._ws.send(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            message = self._receive()
            if message.get("id") == call:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message["result"]

    def _receive(self) -> dict:
        message = json.loads(self._ws.recv())
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.problems.append(details.get("exception", {}).get("description", details["text"]))
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.problems.append(" ".join(str(a.get("value")) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.problems.append(f"{entry['text']} {entry.get('url', '')}".strip())
        if method:
            self._events.append(message)
        return message

    def wait_for(self, event: str) -> dict:
        """The first unconsumed occurrence of protocol ``event``; events before it are
        dropped."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            while not self._events:  # recv times out on its own
                self._receive()
            message = self._events.pop(0)
            if message["method"] == event:
                return message["params"]
        raise TimeoutError(f"no {event} within {self.timeout} s")

    def navigate(self, url: str) -> None:
        """Open ``url`` and wait until it has loaded (images included); clears ``problems``."""
        self.problems, self._events = [], []
        result = self.send("Page.navigate", url=url)
        if "errorText" in result:
            raise RuntimeError(f"cannot open {url}: {result['errorText']}")
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values)."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the page as shown."""
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot")["data"]))
        return path


def check_site(browser: Browser, index: Path) -> list[Path]:
    """Open every page of the static site beside ``index``: each renders without console
    errors or exceptions, every image loaded, and every link (and #anchor) resolves to a file
    of the site. Returns the pages checked."""
    folder = index.parent
    pages = sorted(folder.glob("*.html"))
    for page in pages:
        browser.navigate(page.as_uri())
        links = browser.evaluate(
            "Array.from(document.querySelectorAll('a[href]'), a => a.getAttribute('href'))"
        )
        images = browser.evaluate(
            "Array.from(document.images, i => [i.getAttribute('src'), i.naturalWidth])"
        )
        assert browser.problems == [], (page.name, browser.problems)
        assert images and all(width > 0 for _, width in images), (page.name, images)
        for href in links:
            target, _, anchor = href.partition("#")
            assert "//" not in target and (folder / (target or page.name)).is_file(), href
            if anchor:
                assert f'id="{anchor}"' in (folder / (target or page.name)).read_text()
    return pages
