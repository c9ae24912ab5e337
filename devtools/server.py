"""Run the REAL ComfyUI server (the test host's 0.3.75 tree) with this pack installed, on loopback.

    with ComfyServer() as srv:                 # or srv = ComfyServer(); srv.start(); ...; srv.stop()
        pid = srv.post_prompt(api_prompt)     # raises PromptRejected with ComfyUI's HTTP 400 body
        entry = srv.wait(pid, timeout=120)    # the /history entry (outputs, status)

The server runs `main.py` of the ComfyUI tree named in the venv's `comfyui_path` (cwd = that tree,
which is never written to: base, output, user, temp folders and the database live in a temp folder D).
D/custom_nodes/attention_control is a symlink to this repo, so the pack loads under the module name
`attention_control`, as it would when cloned into a real ComfyUI. Checkpoints are linked into
D/models/checkpoints. HTTP uses the stdlib only (urllib), always with timeouts.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from devtools.host import PACK_NAME, REPO, comfy_root

log = logging.getLogger("attention_control.devtools.server")

PACK_NODE_PREFIX = "AttnCtl_"
REQUIRED_PACK_NODES = ("AttnCtl_CaptureAttention", "AttnCtl_AttentionHeatmap")


class ServerError(RuntimeError):
    """The server did not start, died, or did not answer in time."""


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: ComfyUI's validation error. `.body` is the parsed JSON body."""

    def __init__(self, body):
        self.body = body
        err = body.get("error", {}) if isinstance(body, dict) else {}
        msg = err.get("message", "") if isinstance(err, dict) else str(err)
        details = err.get("details", "") if isinstance(err, dict) else ""
        node_errors = body.get("node_errors", {}) if isinstance(body, dict) else {}
        super().__init__(f"prompt rejected: {msg} {details} node_errors={json.dumps(node_errors)[:2000]}")


class PromptFailed(RuntimeError):
    """The prompt ran and ended with status 'error'. `.entry` is the history entry."""

    def __init__(self, prompt_id, entry):
        self.prompt_id = prompt_id
        self.entry = entry
        super().__init__(f"prompt {prompt_id} failed: {execution_error_message(entry)}")


def execution_error_message(entry: dict) -> str:
    """The exception message of the execution_error in a history entry's status messages ('' if none)."""
    for event, data in (entry.get("status") or {}).get("messages", []):
        if event == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): " \
                   f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""


def _die_with_parent():
    """preexec_fn: the server gets SIGTERM when the process that started it dies (Linux), so a killed test
    run leaves no orphan server behind."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001  not Linux: atexit still stops it
        pass


_RUNNING: "set[ComfyServer]" = set()


@atexit.register
def _stop_all():
    for srv in list(_RUNNING):
        srv.stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, checkpoints: dict[str, str] | list[str] | None = None, port: int | None = None,
                 base_dir: str | None = None, startup_timeout: float = 180.0, extra_args: list[str] | None = None,
                 python: str | None = None, front_end: bool = False):
        """checkpoints: files to link into models/checkpoints ({name: path} or paths, named by basename).
        front_end: serve the real front end (the installed comfyui-frontend-package, as a stock ComfyUI does)
        instead of an empty --front-end-root (the default: API-only tests need no front end)."""
        if isinstance(checkpoints, (list, tuple)):
            checkpoints = {os.path.basename(p): p for p in checkpoints}
        self.checkpoints = dict(checkpoints or {})
        self.port = port
        self._own_base = base_dir is None
        self.base_dir = base_dir
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args or [])
        self.python = python or sys.executable
        self.front_end = front_end
        self.proc: subprocess.Popen | None = None
        self.log_path: str | None = None
        self._log_file = None
        self.object_info: dict | None = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> str:
        return os.path.join(self.base_dir, "output")

    def add_checkpoint(self, path: str, name: str | None = None) -> str:
        """Links a checkpoint file into models/checkpoints (works while running: ComfyUI rescans)."""
        name = name or os.path.basename(path)
        dst = os.path.join(self.base_dir, "models", "checkpoints", name)
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(os.path.abspath(path), dst)
        return name

    def _prepare_base(self):
        if self.base_dir is None:
            self.base_dir = tempfile.mkdtemp(prefix="attnctl-comfy-")
        d = self.base_dir
        for sub in ("custom_nodes", "models/checkpoints", "output", "input", "temp", "user", "front_end"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        link = os.path.join(d, "custom_nodes", PACK_NAME)
        if not os.path.lexists(link):
            os.symlink(REPO, link)
        inputs = os.path.join(REPO, "example_workflows", "input")      # images the example workflows load
        for name in sorted(os.listdir(inputs)) if os.path.isdir(inputs) else []:
            shutil.copyfile(os.path.join(inputs, name), os.path.join(d, "input", name))
        for name, path in self.checkpoints.items():
            self.add_checkpoint(path, name)

    def start(self) -> "ComfyServer":
        root = comfy_root()
        self._prepare_base()
        if self.port is None:
            self.port = free_port()
        d = self.base_dir
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", d, "--output-directory", os.path.join(d, "output"),
               *([] if self.front_end else ["--front-end-root", os.path.join(d, "front_end")]),
               "--disable-api-nodes",
               "--database-url", "sqlite:///" + os.path.join(d, "user", "comfyui.db"),
               *self.extra_args]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONDONTWRITEBYTECODE"] = "1"      # never write into the ComfyUI tree
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("PYTHONPATH", None)               # the repo must not shadow ComfyUI's nodes.py
        self.log_path = os.path.join(d, "server.log")
        self._log_file = open(self.log_path, "ab")
        log.info("starting ComfyUI on %s (base %s, log %s)", self.url, d, self.log_path)
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        _RUNNING.add(self)
        try:
            self._wait_ready()
            self._check_pack()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + self.startup_timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} during start-up\n{self.log_tail()}")
            try:
                self.object_info = self.get_json("/object_info", timeout=30)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, json.JSONDecodeError) as e:
                last = e
            time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer /object_info within {self.startup_timeout:.0f} s "
                          f"(last error: {last!r})\n{self.log_tail()}")

    def _check_pack(self):
        missing = [n for n in REQUIRED_PACK_NODES if n not in self.object_info]
        if missing:
            raise ServerError(f"the pack's nodes {missing} are missing from /object_info: the pack failed to "
                              f"import\n{self.log_tail(120)}")
        with open(self.log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        # ComfyUI lists "0.1 seconds (IMPORT FAILED): <path>" for a custom node folder that raised on import
        if re.search(r"\(IMPORT FAILED\):[^\n]*" + re.escape(PACK_NAME), text):
            raise ServerError(f"ComfyUI reports IMPORT FAILED for {PACK_NAME}\n{self.log_tail(120)}")

    def pack_nodes(self) -> list[str]:
        return sorted(n for n in (self.object_info or {}) if n.startswith(PACK_NODE_PREFIX))

    def stop(self, timeout: float = 15.0):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None
        _RUNNING.discard(self)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self):
        """stop() and remove the temp base folder (if this object created it)."""
        self.stop()
        if self._own_base and self.base_dir and os.path.isdir(self.base_dir):
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return "(no server log)"
        if self._log_file is not None:
            self._log_file.flush()
        with open(self.log_path, "rb") as f:
            text = f.read()[-200_000:].decode("utf-8", "replace")
        return "--- server log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    def _assert_alive(self):
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ServerError(f"ComfyUI is not running (exit code {code})\n{self.log_tail()}")

    # ---------------------------------------------------------------- HTTP
    def get_json(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def post_json(self, path: str, data, timeout: float = 60):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode("utf-8"),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            return json.loads(body.decode("utf-8")) if body else None

    def post_prompt(self, api_prompt: dict, client_id: str = "attnctl-devtools") -> str:
        """Queues an API-format prompt; returns its prompt_id. Raises PromptRejected on HTTP 400."""
        self._assert_alive()
        try:
            res = self.post_json("/prompt", {"prompt": api_prompt, "client_id": client_id})
        except urllib.error.HTTPError as e:
            raw = e.read().decode("utf-8", "replace")
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                raise ServerError(f"POST /prompt answered {e.code}: {raw[:2000]}") from None
            if e.code == 400:
                raise PromptRejected(body) from None
            raise ServerError(f"POST /prompt answered {e.code}: {raw[:2000]}") from None
        return res["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        """Polls /history/<id> until the prompt is done; returns the history entry. Raises ServerError on
        timeout (after interrupting the prompt) or if the server died."""
        deadline = time.monotonic() + timeout
        while True:
            self._assert_alive()
            try:
                hist = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}", timeout=30)
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
                hist = {}
            entry = hist.get(prompt_id)
            if entry is not None:          # ComfyUI writes the history entry when the prompt is done
                return entry
            if time.monotonic() > deadline:
                self.interrupt()
                raise ServerError(f"prompt {prompt_id} not done within {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, api_prompt: dict, timeout: float = 300.0, check: bool = True) -> dict:
        """post_prompt + wait; with check, raises PromptFailed when the run ended in an error."""
        pid = self.post_prompt(api_prompt)
        entry = self.wait(pid, timeout)
        if check and (entry.get("status") or {}).get("status_str") != "success":
            raise PromptFailed(pid, entry)
        return entry

    def interrupt(self):
        try:
            self.post_json("/interrupt", {}, timeout=10)
        except Exception as e:  # noqa: BLE001  best effort
            log.warning("interrupt failed: %r", e)

    def output_images(self, entry: dict) -> list[str]:
        """Absolute paths of the images that SaveImage nodes wrote for a history entry (type 'output')."""
        paths = []
        for node_id in sorted(entry.get("outputs", {}), key=_node_sort_key):
            for img in entry["outputs"][node_id].get("images", []):
                if img.get("type") != "output":
                    continue
                paths.append(os.path.join(self.output_dir, img.get("subfolder", ""), img["filename"]))
        return paths


def _node_sort_key(node_id: str):
    try:
        return (0, int(node_id), "")
    except ValueError:
        return (1, 0, node_id)
