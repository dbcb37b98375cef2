"""Start a real ComfyUI server in a private base directory and drive it over its HTTP API.

Used by the demo and the end-to-end tests. The base directory holds `models/`, `input/`, `output/`, `user/`
and `custom_nodes/` with this repository linked in, so the user's own ComfyUI folders are never touched.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from ...mole_ops.errors import MoLEError
from .host import REPO_ROOT, comfyui_path

PACKAGE_DIR_NAME = "ComfyUI-MoLE"


class ServerError(MoLEError):
    """The server did not start, refused a graph, or a graph failed. The message's first line says what; the
    lines after it are the server log's tail (the command line prints the first line and the log's path)."""

    def __init__(self, message: str, log_path: Path | None = None):
        super().__init__(message)
        self.log_path = log_path

    def summary(self) -> str:
        first = str(self).strip().splitlines()[0] if str(self).strip() else "the ComfyUI server failed"
        return first.rstrip(":") + (f" (server log: {self.log_path})" if self.log_path else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base: Path, models: dict[str, list[Path]] | None = None) -> Path:
    """Lay out a ComfyUI base directory: this package in custom_nodes, the given files in models/<folder>/."""
    base = Path(base)
    for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACKAGE_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    # Stops the frontend's first-visit templates dialog.
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    for folder, files in (models or {}).items():
        target = base / "models" / folder
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            dest = target / Path(f).name
            if not dest.exists():
                try:
                    dest.hardlink_to(f)
                except OSError:
                    shutil.copy2(f, dest)
    return base


def failure(status: dict) -> str:
    """What failed in a /history status, in one line: the node, its type and the exception message."""
    for kind, data in status.get("messages") or []:
        if kind == "execution_error":
            message = " ".join(str(data.get("exception_message", "")).split())
            return f"node {data.get('node_id')} ({data.get('node_type')}): {message}"
    return str(status.get("status_str"))


def _die_with_parent() -> None:
    """In the server's process before exec (Linux): SIGTERM when the process that started it dies, so a client
    killed hard (SIGKILL, the OOM killer) leaves no server behind in its own session."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG


class ComfyServer:
    """`python main.py --cpu` (or on the GPU: cpu=False) on a free loopback port; a context manager that stops it
    by PID."""

    def __init__(self, base_dir: Path, port: int | None = None, extra_args: list[str] | None = None,
                 start_timeout: float = 120.0, cpu: bool = True):
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout
        self.cpu = cpu
        self.log_path = self.base_dir / "server.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ComfyServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        comfy = comfyui_path()
        cmd = [sys.executable, str(comfy / "main.py"), *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1",
               "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base_dir), "--use-pytorch-cross-attention",
               *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=comfy, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode}:\n{self.log_tail()}",
                                  self.log_path)
            try:
                self.get("/object_info/CheckpointLoaderSimple")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.25)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {self.start_timeout:.0f} s:\n{self.log_tail()}",
                          self.log_path)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path} answered {e.code}: {e.read().decode(errors='replace')}") from e

    def queue(self, graph: dict) -> str:
        """Post an API-format graph; returns its prompt id. A graph the server rejects raises ServerError."""
        return self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Poll /history until the prompt finished; returns its history entry or raises with the error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise ServerError(f"prompt {prompt_id} failed: {failure(status)}\n"
                                      f"{json.dumps(status.get('messages'))[:4000]}", self.log_path)
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}", self.log_path)
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, graph: dict, timeout: float = 600.0) -> dict:
        """Queue a graph and wait for it; returns {node_id: outputs}."""
        return self.wait(self.queue(graph), timeout)["outputs"]

    def output_files(self, outputs: dict, kind: str = "images") -> list[Path]:
        """The files the graph's output nodes wrote, as paths in this base directory."""
        files = []
        for node_out in outputs.values():
            for item in node_out.get(kind, []):
                files.append(self.base_dir / item.get("type", "output") / item.get("subfolder", "") / item["filename"])
        return files
