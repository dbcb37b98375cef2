"""A process in a side environment (ImageReward's, the detector's: packages whose pins clash with ComfyUI's), spoken
to as JSON lines: it answers one line `{"ready": true, ...}` once loaded (or `{"error": ...}`), then one line per
request. An answer that never comes (the process died) is an `{"error": ...}` with the end of its stderr."""
from __future__ import annotations

import json
import subprocess


class SideProcess:
    def __init__(self, cmd: list[str], what: str, error: type[Exception]):
        """Start `cmd` and wait for its ready line; `error(message)` is raised when it does not come."""
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.ready = self.reply()
        if not self.ready.get("ready"):
            self.close()
            raise error(f"{what}: {self.ready.get('error', 'the process did not start')}")

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            return {"error": f"the process ended: {err.strip()[-2000:]}"}
        return json.loads(line)

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
