"""Helpers shared by the tests: the vllm CLI, a real `vllm serve` on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
ON_CUDA = os.environ.get("VLLM_HA_TEST_DEVICE", "cpu") == "cuda"

# Loopback only, no hub, no telemetry; CPU KV space small enough for CI.
SERVE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "UCX_NET_DEVICES": "lo",
}
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TORCHDYNAMO_DISABLE": "1"}


def vllm_cli() -> list[str]:
    """The `vllm` console script of this interpreter, or the module where there is none
    (the GPU host runs an applied site dir without scripts)."""
    script = Path(sys.executable).parent / "vllm"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **SERVE_ENV, **({} if ON_CUDA else CPU_ENV)}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """`vllm serve` in its own process group on 127.0.0.1, torn down on exit."""

    def __init__(self, model: str, args: list[str], log: Path, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 600.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        extra = os.environ.get("VLLM_HA_TEST_SERVE_ARGS", "").split()
        # An empty model: `vllm serve --restore-from DIR` takes it from the snapshot.
        cmd = [*vllm_cli(), "serve", *([model] if model else []), "--host", "127.0.0.1", "--port", str(self.port),
               *args, *extra]
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env or child_env(), start_new_session=True)
        self._wait_healthy(startup_timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n"
                                   + self.tail())
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.close()
        raise TimeoutError(f"vllm serve not healthy after {timeout_s:.0f} s:\n" + self.tail())

    def tail(self, n: int = 40) -> str:
        if not self._log.closed:
            self._log.flush()
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-n:])

    def post(self, path: str, body: dict, **kw) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=kw.pop("timeout", 120), **kw)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
            # Logs of remote runs (the GPU host) must come back with the results.
            keep = os.environ.get("VLLM_HA_TEST_LOG_DIR")
            if keep:
                name = f"{self.log_path.parent.name}-{self.log_path.name}"
                shutil.copyfile(self.log_path, Path(keep) / name)

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_tiny_model(dest: Path) -> Path:
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), str(dest)],
                   check=True, capture_output=True, env=child_env())
    return dest


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
