"""llama-server under watch, for `peftflow serve`: started, restarted when it dies, stopped with nothing left behind.

In: llama-server's command line (pipeline.serve builds it), the port it listens on, a log file for its output.
Out: a `Backend` whose `state` the serving layer reads before each request ("ready", else a 503 with Retry-After)
and whose `health()` `GET /health` reports.
  - `start()` blocks until the first llama-server answers /health (or raises, quoting its last log lines);
  - `watch()` (a task on the serving event loop) polls the process every 0.2 s; a dead one is reaped (no zombie),
    logged, and started again after a back-off of 0.5 s doubling to 8 s, at most `max_restarts` times in `window`
    seconds; past that the state is "failed": every request gets a 503 naming the log, until `peftflow serve`
    is restarted (by you or the service manager that runs it);
  - `lost()`: what a request that could not reach llama-server answers (a 503), after checking the process;
  - `stop()`: SIGTERM, SIGKILL after 10 s, waited for.
Each llama-server is started from the thread that runs the event loop with PR_SET_PDEATHSIG (Linux), so it ends
when the serving process ends, however that ends (the signal follows the thread that started the child: no worker
thread starts one).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx

from pipeline.api import ApiError
from pipeline.core.stage import PipelineError

POLL_S = 0.2


def die_with_parent() -> None:
    """In the child before exec (Linux): end it with SIGTERM when the thread that started it ends."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def exit_text(code: int | None) -> str:
    if code is None:
        return "running"
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


class Backend:
    """One llama-server process at a time, on one port, watched and restarted."""

    def __init__(self, cmd: list[str], port: int, log: Path, max_restarts: int = 5, window: float = 600.0,
                 ready_timeout: float = 120.0):
        self.cmd, self.port, self.log = cmd, port, log
        self.max_restarts, self.window, self.ready_timeout = max_restarts, window, ready_timeout
        self.proc: subprocess.Popen | None = None
        self.state = "stopped"  # starting, ready, restarting, failed, stopped
        self.restarts: list[float] = []  # monotonic times of restarts
        self.last_exit: str | None = None
        self.since = time.monotonic()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self.since = time.monotonic()

    def log_tail(self, n: int = 3) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return " | ".join(lines[-n:])

    def start(self) -> None:
        """The first start: returns when llama-server answers /health, else raises with its last log lines."""
        self.state = "starting"
        self.spawn()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.state = "failed"
                raise PipelineError(f"serve: llama-server exited ({exit_text(self.proc.returncode)}): "
                                    f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.state = "ready"
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise PipelineError(f"serve: llama-server did not become ready in {self.ready_timeout:.0f} s ({self.log})")

    def check(self) -> str:
        """The state, after looking at the process (a dead one is reaped here)."""
        if self.state == "ready" and self.proc is not None and self.proc.poll() is not None:
            self.last_exit = f"{exit_text(self.proc.returncode)} after {time.monotonic() - self.since:.0f} s"
            self.state = "restarting"
            say(f"llama-server (pid {self.proc.pid}) ended: {self.last_exit}; restarting")
        return self.state

    def lost(self) -> ApiError:
        """The answer for a request that llama-server did not answer (it died, or is starting again)."""
        state = self.check()
        if state == "failed":
            return ApiError(503, f"llama-server failed {len(self.restarts)} restarts in {self.window:.0f} s "
                                 f"({self.last_exit}); see {self.log}; restart peftflow serve", None,
                            "backend_failed")
        why = f" ({self.last_exit})" if self.last_exit else ""
        return ApiError(503, f"llama-server is {state if state != 'ready' else 'busy'}{why}; retry shortly", None,
                        "backend_unavailable", retry_after=2)

    def ready(self) -> None:
        """Raise the 503 a request gets while llama-server is not serving."""
        if self.check() != "ready":
            raise self.lost()

    async def watch(self) -> None:
        """Until cancelled: find a dead llama-server within POLL_S and start another (bounded, with back-off)."""
        failures = 0
        while True:
            await asyncio.sleep(POLL_S)
            if self.check() != "restarting":
                continue
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < self.window]
            if len(self.restarts) >= self.max_restarts:
                self.state = "failed"
                say(f"llama-server: {self.max_restarts} restarts in {self.window:.0f} s; giving up (see {self.log})")
                return
            await asyncio.sleep(min(0.5 * 2 ** failures, 8.0) if failures else 0)
            self.restarts.append(time.monotonic())
            if await self.restart():
                failures = 0
                say(f"llama-server back (pid {self.proc.pid}) after {time.monotonic() - now:.1f} s; restart "
                    f"{len(self.restarts)} of at most {self.max_restarts} in {self.window:.0f} s")
            else:
                failures += 1

    async def restart(self) -> bool:
        self.spawn()
        deadline = time.monotonic() + self.ready_timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.url + "/health")).status_code == 200:
                        self.state = "ready"
                        return True
                await asyncio.sleep(0.2)
        self.last_exit = f"restart failed: {exit_text(self.proc.poll())}: {self.log_tail(1)}"
        with contextlib.suppress(OSError):
            self.proc.kill()
            self.proc.wait(5)
        return False

    def health(self) -> dict:
        state = self.check()
        return {"state": state, "pid": self.proc.pid if self.proc and state == "ready" else None,
                "restarts": len(self.restarts), "last_exit": self.last_exit,
                "up_seconds": round(time.monotonic() - self.since, 1) if state == "ready" else 0}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            say(f"llama-server (pid {self.proc.pid}) stopped")
        self.state = "stopped"


def say(line: str) -> None:
    print(f"serve: {line}", file=sys.stderr, flush=True)
