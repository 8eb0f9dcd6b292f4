"""Real servers that the tests and benchmarks run as subprocesses (slapd, Dovecot):
finding the program, a free loopback port, waiting for it to listen, stopping."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def find_program(name: str) -> str | None:
    return shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening(process: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """Whether loopback ``port`` accepts a connection within ``timeout`` seconds,
    while ``process`` still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
