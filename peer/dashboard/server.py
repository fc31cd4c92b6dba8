"""The dashboard's web server (aiohttp): the page, its static files and `/api/status`, on a thread of its own so
that it runs beside a monitor's polling or a bootstrap node's main loop."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
START_TIMEOUT_S = 10.0


class DashboardError(RuntimeError):
    """The server cannot start (e.g. the port is taken); one line the user can act on."""


def build_app(status: Callable[[], dict]) -> web.Application:
    """The aiohttp application: `/` (the page), `/static/...` and `/api/status` (what `status()` returns)."""

    async def index(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def api_status(_request: web.Request) -> web.Response:
        # NaN/inf are not JSON: a stranger's value must never make the page's JSON.parse fail
        body = json.dumps(_finite(status()), allow_nan=False)
        return web.Response(text=body, content_type="application/json", headers={"Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/status", api_status)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    return app


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class DashboardServer:
    """Serves the dashboard from a background thread with its own event loop."""

    def __init__(self, status: Callable[[], dict], *, host: str, port: int):
        self.status, self.host, self.port = status, host, port
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="dashboard", daemon=True)

    def start(self) -> int:
        """Start listening; returns the port (useful with port 0). Raises DashboardError if it cannot listen."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            self.port = future.result(timeout=START_TIMEOUT_S)
        except OSError as e:
            self._stop_loop()
            raise DashboardError(
                f"the dashboard cannot listen on {self.host} port {self.port} ({e.strerror or e}); "
                "choose another port"
            ) from None
        return self.port

    async def _start(self) -> int:
        self._runner = web.AppRunner(build_app(self.status), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        return self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._runner is not None and self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            try:
                future.result(timeout=START_TIMEOUT_S)
            except Exception as e:  # shutting down anyway
                logger.debug(f"dashboard cleanup: {e!r}")
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=START_TIMEOUT_S)
        if not self._loop.is_running():
            self._loop.close()
