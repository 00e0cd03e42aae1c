"""Drive the MLflow UI with headless Chromium: an experiment's run table as text and PNG, a matrix walked through.

Used by ``ctlab ui --screenshot`` (a picture of the matrix for reports) and by
the UI test. Chromium is driven over the DevTools protocol (aiohttp's
WebSocket client, already installed with MLflow): open the runs page, expand
parent runs so child runs show, search, open a run's artifacts, read the
visible text, save screenshots.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

log = logging.getLogger(__name__)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1600,1000")
# the expand button of a parent run; expanded ones show a minus sign (this path), collapsed ones a plus
EXPAND_PARENTS = ("document.querySelectorAll('button[data-component-id*=runnamecellrenderer]')"
                  ".forEach(b => { if (!b.innerHTML.includes('M11.5 8.75h-7')) b.click(); })")
PAGE_TEXT = "document.body ? document.body.innerText : ''"
CLOSE_ASSISTANT = '[data-component-id="mlflow.assistant.chat_panel.close"]'
RUN_NAME_HEADER = '.ag-header-cell[col-id="attributes.`Run Name`"]'
RUN_NAME_CELL = '.ag-cell[col-id="attributes.`Run Name`"]'
# run names in view that the table cuts with an ellipsis, and how many pixels the most-cut one lacks
CUT_RUN_NAMES = ("(() => { const cut = []; let lack = 0; document.querySelectorAll(" + json.dumps(RUN_NAME_CELL)
                 + ").forEach(c => c.querySelectorAll('*').forEach(e => { if (e.scrollWidth > e.clientWidth && "
                 "getComputedStyle(e).textOverflow === 'ellipsis') { cut.push(e.innerText); "
                 "lack = Math.max(lack, e.scrollWidth - e.clientWidth); } })); return {cut, lack}; })()")
SEARCH_BOX = '[data-testid="search-box"]'
T = TypeVar("T")


def runs_listed(text: str) -> bool:
    """Whether a runs table has loaded some runs ("3 matching runs"; it reads "0 matching runs" while loading)."""
    return re.search(r"\b[1-9]\d* matching runs", text) is not None


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


class Page:
    """One Chromium tab driven over the DevTools protocol: navigate, read text, run JavaScript, type, screenshot."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._counter = 0

    async def call(self, method: str, **params: Any) -> dict:
        """Send one DevTools command and return its result."""
        self._counter += 1
        await self._ws.send_json({"id": self._counter, "method": method, "params": params})
        while True:
            message = await self._ws.receive_json()
            if message.get("id") == self._counter:
                return message.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def text(self) -> str:
        """The page's visible text."""
        return await self.evaluate(PAGE_TEXT) or ""

    async def wait_for(self, predicate: Callable[[str], bool], timeout: float, settle: float = 1.0) -> str:
        """Poll the page text until ``predicate`` holds (or ``timeout`` passes), let it settle, return the text."""
        deadline = time.time() + timeout
        text = await self.text()
        while not predicate(text) and time.time() < deadline:
            await asyncio.sleep(0.5)
            text = await self.text()
        await asyncio.sleep(settle)
        return await self.text()

    async def goto(self, url: str, expect: str | Callable[[str], bool], timeout: float = 90.0) -> str:
        """Open ``url`` and wait until ``expect`` (a text, or a test of the page text) shows."""
        await self.call("Page.navigate", url=url)
        return await self.wait_for(expect if callable(expect) else lambda t: expect in t, timeout, settle=2.0)

    async def type_into(self, selector: str, text: str) -> None:
        """Focus the element ``selector``, replace its value by typing ``text`` and press Enter."""
        found = await self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                                    "if (!e) return false; e.focus(); e.select && e.select(); return true; })()")
        if not found:
            raise LookupError(f"no element {selector} on the page")
        await self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            await self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    async def click_text(self, text: str) -> bool:
        """Click the first element whose own text is ``text``; False when there is none."""
        xpath = json.dumps(f"//*[normalize-space(text())={json.dumps(text)}]")
        return bool(await self.evaluate(
            f"(() => {{ const e = document.evaluate({xpath}, document, null, XPathResult.FIRST_ORDERED_NODE_TYPE, "
            "null).singleNodeValue; if (!e) return false; e.click(); return true; })()"))

    async def drag(self, x0: float, y: float, x1: float) -> None:
        """Press the mouse at (x0, y), move to (x1, y), release: e.g. widen a column by its resize handle."""
        await self.call("Input.dispatchMouseEvent", type="mousePressed", x=x0, y=y, button="left", clickCount=1)
        for x in (x0 + (x1 - x0) * f for f in (0.25, 0.5, 0.75, 1.0)):
            await self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
        await self.call("Input.dispatchMouseEvent", type="mouseReleased", x=x1, y=y, button="left", clickCount=1)
        await self.call("Input.dispatchMouseEvent", type="mouseMoved", x=1, y=1)  # no tooltip left over

    async def _widen_run_names(self, to_width: float) -> None:
        """Drag the Run Name column's right edge out until the column is ``to_width`` pixels wide."""
        box = await self.evaluate(f"(() => {{ const h = document.querySelector({json.dumps(RUN_NAME_HEADER)}); "
                                  "if (!h) return null; const r = h.getBoundingClientRect(); "
                                  "return [r.right, r.top + r.height / 2, r.width]; })()")
        if box:
            right, middle, width = box
            if (widen := to_width - width) > 0:
                await self.drag(right - 2, middle, right - 2 + widen)
                await asyncio.sleep(1)

    async def tidy_runs_table(self, name_width: int = 380) -> None:
        """Close the assistant side panel and widen the Run Name column so whole names show in a screenshot."""
        await self.evaluate(f"document.querySelector({json.dumps(CLOSE_ASSISTANT)})?.click()")
        await asyncio.sleep(1)
        await self._widen_run_names(name_width)

    async def fit_run_names(self, max_width: int = 760) -> list[str]:
        """Widen the Run Name column until no run name in view is cut by an ellipsis (at most ``max_width``
        pixels wide), so a screenshot shows whole names: "… · frozen_text · seed 1" loses the seed that tells two
        runs apart when cut. Returns the names still cut (none when all fit)."""
        found = await self.evaluate(CUT_RUN_NAMES) or {"cut": [], "lack": 0}
        for _ in range(3):  # a resize re-renders the cells; on a busy machine one pass can measure them mid-render
            width = await self.evaluate(f"document.querySelector({json.dumps(RUN_NAME_HEADER)})"
                                        "?.getBoundingClientRect().width") or max_width
            if found["lack"] <= 0 or width >= max_width:
                break
            await self._widen_run_names(min(max_width, width + found["lack"] + 16))
            await asyncio.sleep(1)
            found = await self.evaluate(CUT_RUN_NAMES) or found
        return list(found["cut"])

    async def screenshot(self, path: Path) -> None:
        """Save the visible page as a PNG."""
        shot = await self.call("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))


async def browse(steps: Callable[[Page], Awaitable[T]]) -> T:
    """Start headless Chromium, run ``steps`` on a blank tab, stop Chromium (helper processes too)."""
    port = free_port()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([find_chromium(), *CHROMIUM_FLAGS, f"--remote-debugging-port={port}",
                                 f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/json/version", timeout=30)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as response:
                target = next(t for t in json.load(response) if t["type"] == "page")
            async with aiohttp.ClientSession() as session, session.ws_connect(target["webSocketDebuggerUrl"],
                                                                              max_msg_size=0) as ws:
                return await steps(Page(ws))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def _render(url: str, screenshot: Path | None, expect: str | Callable[[str], bool], timeout: float) -> str:
    async def steps(page: Page) -> str:
        await page.goto(url, expect, timeout)
        await page.tidy_runs_table()
        await page.evaluate(EXPAND_PARENTS)
        await asyncio.sleep(2)
        if cut := await page.fit_run_names():
            log.warning("%d run name(s) stay cut in the runs table: %s", len(cut), "; ".join(cut[:3]))
        if screenshot is not None:
            await page.screenshot(screenshot)
        return await page.text()

    return await browse(steps)


def render_runs_page(ui_url: str, experiment_id: str, screenshot: Path | None = None,
                     expect: str | Callable[[str], bool] = runs_listed, timeout: float = 90.0) -> str:
    """The visible text of an experiment's runs table (parents expanded); optionally saved as a PNG.

    Waits until ``expect`` shows (by default: some runs are listed; up to ``timeout`` seconds)."""
    url = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return asyncio.run(_render(url, screenshot, expect, timeout))


@dataclass
class MatrixView:
    """What the UI showed of one matrix: the runs table with the parent collapsed and expanded, the table after
    a search, the parent run's artifact list and its report.md preview; the run names the expanded table still
    cut with an ellipsis after widening its Run Name column (none when every name shows whole)."""

    collapsed: str
    expanded: str
    searched: str
    artifacts: str
    report: str
    cut_names: list[str]


def browse_matrix(ui_url: str, experiment_id: str, parent_run_id: str, search: str, runs_png: Path | None = None,
                  artifacts_png: Path | None = None, timeout: float = 90.0) -> MatrixView:
    """Walk a matrix in the real UI as a user would: open the experiment's runs table, expand the parent run,
    type ``search`` into the search box (parent expanded again), then open the parent run's artifacts and
    preview report.md. Screenshots of the expanded runs table and of the report preview are optional."""
    base = ui_url.rstrip("/")

    async def steps(page: Page) -> MatrixView:
        collapsed = await page.goto(f"{base}/#/experiments/{experiment_id}/runs", runs_listed, timeout)
        await page.tidy_runs_table()
        await page.evaluate(EXPAND_PARENTS)
        expanded = await page.wait_for(lambda t: len(t) > len(collapsed), 20)
        cut_names = await page.fit_run_names()
        if runs_png is not None:
            await page.screenshot(runs_png)
        await page.type_into(SEARCH_BOX, search)
        await page.wait_for(lambda t: t != expanded, 30)
        await page.evaluate(EXPAND_PARENTS)
        searched = await page.wait_for(lambda t: False, 0, settle=3.0)
        artifacts, report = await _open_artifact(page, base, experiment_id, parent_run_id, "report.md",
                                                 "Ablation report", artifacts_png, timeout)
        return MatrixView(collapsed, expanded, searched, artifacts, report, cut_names)

    return asyncio.run(browse(steps))


async def _open_artifact(page: Page, base: str, experiment_id: str, run_id: str, name: str, expect: str,
                         screenshot: Path | None, timeout: float) -> tuple[str, str]:
    """Open a run's Artifacts tab, click ``name`` to preview it; the tab's text before and after the click."""
    listing = await page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts", name, timeout)
    await page.evaluate(f"document.querySelector({json.dumps(CLOSE_ASSISTANT)})?.click()")
    preview = ""
    if await page.click_text(name):
        preview = await page.wait_for(lambda t: expect in t, 30)
    if screenshot is not None:
        await page.screenshot(screenshot)
    return listing, preview


def render_run_artifact(ui_url: str, experiment_id: str, run_id: str, screenshot: Path, name: str = "report.md",
                        expect: str = "Ablation report", timeout: float = 90.0) -> str:
    """The text of a run's Artifacts tab previewing artifact ``name`` (a matrix parent's report.md), as a PNG."""
    async def steps(page: Page) -> str:
        return (await _open_artifact(page, ui_url.rstrip("/"), experiment_id, run_id, name, expect, screenshot,
                                     timeout))[1]

    return asyncio.run(browse(steps))
