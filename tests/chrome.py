"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`, so no
extra package): what tests/test_ui.py and scripts/screenshots.py load pages with."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# as root on a closed network: no sandbox, no GPU, and none of Chromium's own connections
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]


def find_chromium() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class Chrome:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4, NUL-terminated JSON)."""

    def __init__(self, executable: str, url: str):
        self.profile = tempfile.mkdtemp(prefix="harness-chrome-")
        to_chrome_r, self._out = os.pipe()
        self._in, from_chrome_w = os.pipe()

        def give_fds():  # in the child: our pipe ends as fds 3 (its input) and 4 (its output)
            r, w = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [executable, *CHROME_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe", url],
            preexec_fn=give_fds,
            close_fds=False,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer, self._id, self._session = b"", 0, None
        for _ in range(100):
            pages = [t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page"]
            if pages:
                break
            time.sleep(0.1)
        self._session = self.send(
            "Target.attachToTarget",
            {"targetId": pages[0]["targetId"], "flatten": True},
        )["sessionId"]

    def send(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if self._session:
            message["sessionId"] = self._session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    assert "error" not in reply, reply
                    return reply["result"]
            poller = (
                select.poll()
            )  # (not select(): a process with over 1,024 descriptors open has this one past its range)
            poller.register(self._in, select.POLLIN)
            ready = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            if not ready:
                raise TimeoutError(f"Chromium did not answer {method} in {timeout} s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed its DevTools pipe")
            self._buffer += chunk

    def js(self, expression: str):
        return self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"].get("value")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 90) -> str:
        def shown() -> str | None:
            text = self.text()
            return text if all(n in text for n in needles) else None

        return self.wait_for(shown, lambda text: str([n for n in needles if n not in text]), timeout)

    def wait_for_js(self, expression: str, what: str, timeout: float = 90):
        """Evaluate `expression` until it is truthy (an element the page renders after its text, say)."""
        return self.wait_for(lambda: self.js(expression), lambda text: what, timeout)

    def wait_for(self, check, missing, timeout: float = 90):
        """Poll `check()` until it is truthy; past `timeout`, fail naming `missing(page text)`."""
        deadline = time.monotonic() + timeout
        while not (value := check()):
            if time.monotonic() > deadline:
                text = self.text()
                raise AssertionError(f"{missing(text)} not on the page after {timeout} s; it shows: {text[:2000]}")
            time.sleep(0.25)
        return value

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for fd in (self._in, self._out):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def screenshot(self, path, selector: str | None = None) -> None:
        """The page (or the element `selector` picks) as a PNG."""
        params = {"format": "png"}
        if selector:
            box = self.js(
                f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                " return [r.x, r.y, r.width, r.height]; })()"
            )
            params["clip"] = dict(zip(("x", "y", "width", "height"), box), scale=1)
        data = self.send("Page.captureScreenshot", params)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
