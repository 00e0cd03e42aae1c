"""Render an experiment's run table in the MLflow UI with headless Chromium: its text and a PNG.

Used by ``ctlab ui --screenshot`` (a picture of the matrix for reports) and by
the UI test. Chromium is driven over the DevTools protocol (aiohttp's
WebSocket client, already installed with MLflow): open the runs page, expand
parent runs so child runs show, return the visible text, save a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1600,1000")
EXPAND_PARENTS = "document.querySelectorAll('button[data-component-id*=runnamecellrenderer]').forEach(b => b.click())"
PAGE_TEXT = "document.body ? document.body.innerText : ''"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_chromium() -> str:
    """The Chromium executable; a clear error naming the package when it is missing."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise FileNotFoundError("headless Chromium is needed: apt-get install chromium")


def wait_for_http(url: str, timeout: float = 120.0) -> None:
    """Block until ``url`` answers 200, or raise TimeoutError."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


async def _render(url: str, screenshot: Path | None, expect: str, timeout: float) -> str:
    port = free_port()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([find_chromium(), *CHROMIUM_FLAGS, f"--remote-debugging-port={port}",
                                 f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/json/version", timeout=30)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as response:
                page = next(t for t in json.load(response) if t["type"] == "page")
            async with aiohttp.ClientSession() as session, session.ws_connect(page["webSocketDebuggerUrl"],
                                                                              max_msg_size=0) as ws:
                counter = 0

                async def call(method: str, **params) -> dict:
                    nonlocal counter
                    counter += 1
                    await ws.send_json({"id": counter, "method": method, "params": params})
                    while True:
                        message = await ws.receive_json()
                        if message.get("id") == counter:
                            return message.get("result", {})

                async def text() -> str:
                    result = await call("Runtime.evaluate", expression=PAGE_TEXT, returnByValue=True)
                    return result.get("result", {}).get("value", "")

                await call("Page.navigate", url=url)
                deadline = time.time() + timeout
                while expect not in await text() and time.time() < deadline:
                    await asyncio.sleep(0.5)
                await asyncio.sleep(2)  # let the grid finish rendering
                await call("Runtime.evaluate", expression=EXPAND_PARENTS)
                await asyncio.sleep(2)
                if screenshot is not None:
                    shot = await call("Page.captureScreenshot", format="png")
                    screenshot.parent.mkdir(parents=True, exist_ok=True)
                    screenshot.write_bytes(base64.b64decode(shot["data"]))
                return await text()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # Chromium's helper processes too
            proc.wait()


def render_runs_page(ui_url: str, experiment_id: str, screenshot: Path | None = None,
                     expect: str = "matching runs", timeout: float = 90.0) -> str:
    """The visible text of an experiment's runs table (parents expanded); optionally saved as a PNG."""
    url = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return asyncio.run(_render(url, screenshot, expect, timeout))
