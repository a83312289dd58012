"""Fixtures for the browser test: a private JupyterLab server and a headless system Chromium.

The server is started the way `make lab` starts it (the `.venv`'s `jupyter lab`, `--allow-root` as root), on a
free loopback port with a random token. Everything it would write under `~` (config, data, runtime, settings,
workspaces, IPython and matplotlib caches) goes to a temporary directory instead, so the test leaves no trace.

It serves a mirror of the repository, not the repository itself: `chapters/` is copied, every other top-level
entry is a symlink to the real one. A notebook runs with the same layout around it (its working directory is
`<mirror>/chapters`, `minillm` is the editable install), but JupyterLab's autosave, a crash halfway or a
learner-style "Save" can never write outputs into the committed notebooks, which only `make notebooks` may do.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
JUPYTER = VENV_BIN / "jupyter"
CHROMIUM = Path("/usr/bin/chromium")
# Keep Chromium quiet on a machine without network or GPU (measured: /work/shared/notes/browser.md);
# --disable-dev-shm-usage because containers often mount a 64 MB /dev/shm, too small for the page's renderer.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SERVER_START_TIMEOUT_S = 90
SCREENSHOTS = Path(__file__).parent / "screenshots"
SESSION_START = time.time()

# JupyterLab settings for the test server only. The news toast ("get notified about official Jupyter news?")
# covers the lower right corner of the page; autosave would write the run's outputs into the notebook copy;
# the blank space JupyterLab adds below the last cell would only pad the full-notebook screenshot.
DISABLED_PLUGINS = {"@jupyterlab/apputils-extension:announcements": True}
USER_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"scrollPastEnd": False},
}


@dataclass
class LabServer:
    repo: Path          # the real repository; its chapters/ holds the committed notebooks
    venv_bin: Path      # .venv/bin: the server and its kernels must run on a Python from here
    url: str            # http://127.0.0.1:PORT
    token: str
    root: Path          # the mirror of the repository the server serves
    private_dir: Path   # its config/data/runtime directories; a kernel's command line names this path
    log_path: Path
    process: subprocess.Popen

    def get(self, path: str, method: str = "GET") -> str:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()

    def api(self, path: str):
        """GET a Jupyter REST endpoint and return the decoded JSON."""
        return json.loads(self.get(path))

    def shut_down_sessions(self, notebook_path: str) -> None:
        """Stop the kernel of a notebook a failed test left open, so the next test starts from a fresh one."""
        for session in self.api("/api/sessions"):
            if session["path"] == notebook_path:
                self.get(f"/api/sessions/{session['id']}", method="DELETE")

    def is_venv_python(self, executable: str) -> bool:
        """True for .venv/bin/python, python3 or python3.11 (unresolved: they all link to the same base interpreter,
        and only the path inside .venv makes Python use the venv's site-packages)."""
        return Path(executable).parent == self.venv_bin and Path(executable).name.startswith("python")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @staticmethod
    def processes_naming(text: str) -> list[int]:
        """PIDs whose command line contains `text` (our private directory: the server's kernels, nothing else)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(proc.name))
        return pids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mirror_repository(target: Path) -> Path:
    """`chapters/` copied, every other visible top-level entry symlinked: the repo's layout, safe to write."""
    target.mkdir()
    for entry in REPO.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.name == "chapters":
            shutil.copytree(entry, target / entry.name, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        else:
            (target / entry.name).symlink_to(entry)
    return target


def private_jupyter_dirs(base: Path) -> dict[str, str]:
    """Environment variables that point every per-user Jupyter/IPython/matplotlib directory under `base`."""
    dirs = {name: base / sub for name, sub in [
        ("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"), ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"), ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces"),
        ("IPYTHONDIR", "ipython"), ("MPLCONFIGDIR", "matplotlib")]}
    for path in dirs.values():
        path.mkdir(parents=True)
    labconfig = dirs["JUPYTER_CONFIG_DIR"] / "labconfig"
    labconfig.mkdir()
    (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": DISABLED_PLUGINS}))
    for name, settings in USER_SETTINGS.items():
        path = dirs["JUPYTERLAB_SETTINGS_DIR"] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    return {name: str(path) for name, path in dirs.items()}


def stop_server(server: LabServer) -> None:
    """Stop the server's process group, then any kernel it left behind.

    jupyter_client starts each kernel in a session of its own, so killing the server's group alone could orphan
    a kernel; the kernels are found by the private runtime directory on their command line.
    """
    try:
        os.killpg(server.process.pid, signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
        server.process.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
    for pid in server.processes_naming(str(server.private_dir)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until_answering(server: LabServer) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {server.process.returncode}; its log:\n{server.log()}")
        try:
            server.api("/api/status")
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"jupyter lab did not answer within {SERVER_START_TIMEOUT_S} s; its log:\n{server.log()}")


@pytest.fixture(scope="session")
def lab(request, tmp_path_factory) -> LabServer:
    if not JUPYTER.exists():
        pytest.skip(f"{JUPYTER} is missing: run `make setup` (or `make test-browser`, which runs it)")
    base = tmp_path_factory.mktemp("lab")
    root = mirror_repository(base / REPO.name)
    private_dir = base / "jupyter"
    env = {**os.environ, **private_jupyter_dirs(private_dir)}
    port, token = free_port(), secrets.token_hex(16)
    command = [str(JUPYTER), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               "--LabApp.default_url=/lab/tree/chapters"]
    if os.getuid() == 0:
        command.append("--allow-root")  # as `make lab` does
    log_path = base / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = LabServer(REPO, VENV_BIN, f"http://127.0.0.1:{port}", token, root, private_dir, log_path, process)
    request.addfinalizer(lambda: stop_server(server))  # registered before anything can fail
    wait_until_answering(server)
    print(f"\njupyter lab on {server.url} serving {root}; log: {log_path}")
    return server


@pytest.fixture(scope="session")
def browser(request):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run `make test-browser` (it installs Debian's chromium with apt-get)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: run `make setup`")
    playwright = sync_api.sync_playwright().start()
    request.addfinalizer(playwright.stop)
    chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
    request.addfinalizer(chromium.close)
    return chromium


@pytest.fixture(scope="session")
def screenshots_dir() -> Path:
    SCREENSHOTS.mkdir(exist_ok=True)
    return SCREENSHOTS


def pytest_terminal_summary(terminalreporter):
    """List the screenshots this run took, even when the output of passing tests is hidden."""
    taken = sorted(p for p in SCREENSHOTS.glob("*.png") if p.stat().st_mtime >= SESSION_START)
    if taken:
        terminalreporter.section("screenshots")
        for path in taken:
            terminalreporter.write_line(str(path))
