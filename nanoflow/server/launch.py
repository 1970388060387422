"""Start ``nanoflow serve`` as a child process and wait until it answers, for tests and
benchmark scripts that need a live server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(["builtin", "--max-model-len", "256"]) as server: server.url``.

    The child runs from a temporary folder so that a source checkout's top-level folders never
    shadow installed packages; give absolute paths in ``args``."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        port: int | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "nanoflow.cli.main", "serve", *args]
        self.command += ["--port", str(self.port)]
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path or tempfile.mktemp(prefix="nanoflow-serve-", suffix=".log"))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 600.0) -> ServerProcess:
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            self.command,
            cwd=tempfile.gettempdir(),
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early; log:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout:.0f} s; log:\n{self.log()}")

    def engine_pids(self) -> list[int]:
        """The server's engine processes (its children started by multiprocessing's spawn)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.process.pid and "spawn_main" in cmdline:
                pids.append(int(entry.name))
        return pids

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful shutdown), then SIGKILL if it hangs; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
