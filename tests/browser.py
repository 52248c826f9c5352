"""Headless Chromium driven over the DevTools protocol, for the dashboard test (and, run as a
script, to take the README's screenshot: python tests/browser.py PAGE.html OUT.png [FRAGMENT]).

Chromium: Debian's `chromium` package (`apt-get install chromium`; .ci/run installs it), or the
binary named by $CHROMIUM. Messages go over the page's websocket (websocket-client)."""
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

INSTALL_HINT = ("the dashboard test needs headless Chromium: install it with `apt-get install chromium` "
                "(Debian/Ubuntu; `.ci/run` does this), `brew install --cask chromium` (macOS), or point "
                "$CHROMIUM at a Chrome/Chromium binary")


def find_chromium():
    """The Chromium binary, or None."""
    names = [os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
    return next(filter(None, (shutil.which(n) for n in names if n)), None)


class Chromium:
    """with Chromium() as page: page.open(url); page.evaluate(js); page.errors; page.screenshot(path)."""

    def __init__(self, width=1400, height=900, timeout=60):
        import websocket

        binary = find_chromium()
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file, deadline = Path(self.profile) / "DevToolsActivePort", time.time() + timeout
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"{binary} did not start its DevTools endpoint within {timeout} s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout)
        self.next_id, self.events, self.errors = 0, [], []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def send(self, method, **params):
        """One DevTools command; returns its result (events that arrive meanwhile are kept)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg):
        self.events.append(msg)
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(params["entry"].get("text"))

    def open(self, url, timeout=60):
        """Navigate and wait for the load event."""
        self.events.clear()
        self.send("Page.navigate", url=url)
        deadline = time.time() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.time() > deadline:
                raise TimeoutError(f"{url} did not load within {timeout} s")
            self._event(json.loads(self.ws.recv()))

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, condition, timeout=30):
        """Poll a JavaScript condition until it is truthy; returns its value."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.evaluate(condition)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"not true within {timeout} s: {condition}")

    def screenshot(self, path):
        Path(path).write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return Path(path)

    def close(self):
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    page_path, out = Path(sys.argv[1]).resolve(), sys.argv[2]
    fragment = sys.argv[3] if len(sys.argv) > 3 else ""
    with Chromium() as browser:
        browser.open(page_path.as_uri() + fragment)
        if "latent=" in fragment:
            browser.wait_for("document.querySelectorAll('#detail .example').length")
        browser.screenshot(out)
        print(f"wrote {out}; page errors: {browser.errors or 'none'}")
