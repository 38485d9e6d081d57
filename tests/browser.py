"""A tiny Chrome DevTools Protocol client: headless Chromium driven over one websocket.

Just enough for UI tests: open a page, run JavaScript, wait for text, take a screenshot. It uses
the ``websockets`` package that Dagster's web server already brings (no browser-automation
dependency). One page, one connection, synchronous calls; of the events only the network's are
noted (to wait for a page to settle before a screenshot).

    with Browser.launch() as browser:
        browser.navigate("http://127.0.0.1:3000/assets")
        browser.wait_for_text("rillet_entities", timeout=60)
        browser.screenshot(Path("catalog.png"))
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.sync.client import ClientConnection, connect

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEVTOOLS_LINE = "DevTools listening on "


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH or at /usr/bin/chromium, or None."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    debian = Path("/usr/bin/chromium")
    return str(debian) if debian.exists() else None


class BrowserError(RuntimeError):
    """Chromium did not start, a DevTools call failed, or a page script threw."""


class Browser:
    """Headless Chromium with one page of ``width`` x ``height`` CSS pixels."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        folder: Path,
        socket: ClientConnection,
        session: str,
        timeout: float,
    ) -> None:
        self._process = process
        self._folder = folder
        self._socket = socket
        self._session = session
        self._ids = itertools.count(1)
        self._requests: dict[str, float] = {}  # the page's requests in flight: id -> start time
        self._network_at = time.monotonic()  # when a request last started or ended
        self.timeout = timeout

    @classmethod
    def launch(
        cls,
        executable: str | None = None,
        *,
        width: int = 1600,
        height: int = 1000,
        timeout: float = 60,
        cache: bool = False,
    ) -> Browser:
        """Start Chromium headless, connect to its DevTools websocket and open one page.

        Without ``cache`` every page loads as on a first visit: a web app that measures its layout
        before cached web fonts apply (Dagster's breadcrumbs) then draws as a new visitor sees it.
        """
        executable = executable or find_chromium()
        if executable is None:
            raise BrowserError("no Chromium found (looked for: " + ", ".join(CANDIDATES) + ")")
        folder = Path(tempfile.mkdtemp(prefix="cdp-"))
        stderr_path = folder / "chromium.stderr"
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [
                    executable,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--hide-scrollbars",
                    f"--user-data-dir={folder / 'profile'}",
                    "--remote-debugging-port=0",
                    f"--window-size={width},{height}",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        socket: ClientConnection | None = None
        try:
            url = cls._devtools_url(process, stderr_path, timeout)
            socket = connect(url, proxy=None, max_size=None, open_timeout=timeout, legacy=True)
            browser = cls(process, folder, socket, session="", timeout=timeout)
            target = browser.send("Target.createTarget", url="about:blank")["targetId"]
            attached = browser.send("Target.attachToTarget", targetId=target, flatten=True)
            browser._session = attached["sessionId"]
            browser.send("Network.enable")  # for setCacheDisabled and wait_for_network_idle
            browser.send("Network.setCacheDisabled", cacheDisabled=not cache)
            browser.send(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            if socket is not None:
                socket.close()
            process.kill()
            process.wait()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return browser

    @staticmethod
    def _devtools_url(process: subprocess.Popen[bytes], stderr: Path, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in stderr.read_text(errors="replace").splitlines():
                if DEVTOOLS_LINE in line:
                    return line.split(DEVTOOLS_LINE, 1)[1].strip()
            if process.poll() is not None:
                break
            time.sleep(0.1)
        said = stderr.read_text(errors="replace")[-2000:]
        raise BrowserError(f"Chromium printed no DevTools websocket URL; its stderr:\n{said}")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; returns its result (network events meanwhile are noted)."""
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if self._session:
            message["sessionId"] = self._session
        self._socket.send(json.dumps(message))
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{method}: no answer within {self.timeout:.0f} s")
            answer = self._receive(left)
            if answer is None or answer.get("id") != ident:
                continue
            if "error" in answer:
                raise BrowserError(f"{method}: {answer['error']}")
            return dict(answer.get("result", {}))

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        """The next message (None after ``timeout``); an event only updates the network state."""
        try:
            message: dict[str, Any] = json.loads(self._socket.recv(timeout=timeout))
        except TimeoutError:
            return None
        event, params = message.get("method"), message.get("params", {})
        if event == "Network.requestWillBeSent":
            self._requests[params["requestId"]] = time.monotonic()
            self._network_at = time.monotonic()
        elif event in ("Network.loadingFinished", "Network.loadingFailed"):
            self._requests.pop(params["requestId"], None)
            self._network_at = time.monotonic()
        return message

    def wait_for_network_idle(
        self, idle: float = 0.5, timeout: float = 30, ignore_after: float = 10
    ) -> None:
        """Wait until no request has been in flight for ``idle`` seconds (requests open for
        longer than ``ignore_after`` seconds, such as long polls, do not count)."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            busy = [start for start in self._requests.values() if now - start < ignore_after]
            if not busy and now - self._network_at >= idle:
                return
            if now > deadline:
                raise TimeoutError(f"the page kept loading for {timeout:.0f} s")
            self._receive(0.05)

    def settle(self, timeout: float = 30) -> None:
        """Wait until the page has painted what it loaded: web fonts ready, no request (an icon,
        an image) in flight, and a new frame drawn since."""
        frame = "new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"
        self.evaluate(f"document.fonts.ready.then(() => {frame})")
        self.wait_for_network_idle(timeout=timeout)
        self.evaluate(frame)

    def navigate(self, url: str) -> None:
        """Go to ``url`` and wait until its document has loaded (scripts may render later)."""
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")
        self.wait_for(
            "document.readyState === 'complete' && location.href !== 'about:blank'",
            timeout=self.timeout,
            what=f"{url} to load",
        )

    def evaluate(self, script: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send(
            "Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"script failed: {text}\n{script}")
        return result.get("result", {}).get("value")

    def text(self) -> str:
        """What a reader sees: the page's rendered text."""
        return str(self.evaluate("document.body ? document.body.innerText : ''") or "")

    def wait_for(self, script: str, timeout: float, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(script)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what or script}")
            time.sleep(0.25)

    def wait_for_text(self, text: str, timeout: float) -> str:
        """Wait until ``text`` is in the page's rendered text; returns that text."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.text()
            if text in seen:
                return seen
            if time.monotonic() > deadline:
                url = self.evaluate("location.href")
                raise TimeoutError(
                    f"{text!r} did not appear on {url} within {timeout:.0f} s; "
                    f"the page said:\n{seen[:3000]}"
                )
            time.sleep(0.25)

    def wait_for_match(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until a regular expression matches the page's rendered text; returns the match."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            seen = self.text()
            found = compiled.search(seen)
            if found:
                return found
            if time.monotonic() > deadline:
                url = self.evaluate("location.href")
                raise TimeoutError(
                    f"nothing matched {compiled.pattern!r} on {url} within {timeout:.0f} s; "
                    f"the page said:\n{seen[:3000]}"
                )
            time.sleep(0.25)

    def screenshot(self, path: Path, settle: bool = True) -> Path:
        """Save what the viewport shows as a PNG (overwrites), once the page has settled."""
        if settle:
            self.settle()
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        """Close Chromium and remove its profile folder."""
        try:
            self._session = ""
            self.send("Browser.close")
        except Exception:  # noqa: S110 - already gone; the process is stopped below anyway
            pass
        self._socket.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
