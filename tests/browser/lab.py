"""A throwaway JupyterLab server for the browser test, and the Playwright steps that drive it.

``LabServer`` runs ``python -m jupyterlab`` with this interpreter (the project's venv) on
127.0.0.1, a free port and a random token, in a temporary root directory, with every Jupyter
directory (config, data, runtime, settings, workspaces) inside that directory so nothing from
``~/.jupyter`` leaks in. A ``python3`` kernelspec written there (first on ``JUPYTER_PATH``, so it
wins over any other, and checked at start) runs this interpreter, so the notebook's kernel
imports the modal_magic under test. ``stop()`` shuts the
server down through its API (which shuts down its kernels) and kills whatever is left of its
process tree.

``open_notebook``, ``run_all_cells`` and the locators below are what a person does: open the
notebook in Lab, Run > Run All Cells, look at the output.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# Lab settings that keep pop-ups (news, update checks) off the page and its screenshots.
_USER_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False,
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """A JupyterLab server for one test module; ``start()``, then ``url(path)``, then ``stop()``."""

    def __init__(self, notebooks: list[Path], startup_timeout: float = 60.0) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="modal-magic-lab-"))
        self.root = self.base / "root"
        self.root.mkdir()
        for notebook in notebooks:
            shutil.copy(notebook, self.root / notebook.name)
        self.token = secrets.token_hex(16)
        self.port = 0
        self.startup_timeout = startup_timeout
        self.log_path = self.base / "server.log"
        self.process: subprocess.Popen | None = None

    def _environment(self) -> dict[str, str]:
        jupyter = self.base / "jupyter"
        kernel_dir = jupyter / "data" / "kernels" / "python3"
        kernel_dir.mkdir(parents=True)
        (kernel_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
            "metadata": {"debugger": True},
        }))
        settings = jupyter / "lab-settings"
        for name, values in _USER_SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = dict(os.environ)
        env.update({
            # JUPYTER_PATH comes first in the data path: our python3 kernelspec wins over any other.
            "JUPYTER_PATH": str(jupyter / "data"),
            "JUPYTER_DATA_DIR": str(jupyter / "data"),
            "JUPYTER_CONFIG_DIR": str(jupyter / "config"),
            "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(settings),
            "JUPYTERLAB_WORKSPACES_DIR": str(jupyter / "workspaces"),
            "JUPYTER_PLATFORM_DIRS": "1",
            "PYTHONUNBUFFERED": "1",
        })
        env.pop("JUPYTER_TOKEN", None)
        return env

    def start(self) -> None:
        env = self._environment()
        for attempt in range(3):  # the free port can be taken between finding it and binding it
            self.port = _free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "jupyterlab",
                     "--no-browser",
                     "--ServerApp.ip=127.0.0.1",
                     f"--ServerApp.port={self.port}",
                     "--ServerApp.port_retries=0",
                     f"--IdentityProvider.token={self.token}",
                     f"--ServerApp.root_dir={self.root}",
                     "--ServerApp.allow_remote_access=False",
                     "--LabApp.news_url=",
                     "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                     "--ServerApp.allow_root=True",  # CI runs as root
                     # A safety net if this process dies without stopping the server.
                     "--ServerApp.shutdown_no_activity_timeout=300"],
                    cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if self._wait_ready():
                self._check_kernelspec()
                return
            if self.process.poll() is None:
                break  # running but not answering: a real problem, not a port race
        log = self.log_path.read_text(errors="replace")[-4000:]
        self.stop()
        raise RuntimeError(f"JupyterLab did not start on 127.0.0.1:{self.port}; its log:\n{log}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.api_url("api/status"), timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False

    def _check_kernelspec(self) -> None:
        with urllib.request.urlopen(self.api_url("api/kernelspecs"), timeout=5) as response:
            specs = json.load(response)
        argv = specs["kernelspecs"]["python3"]["spec"]["argv"]
        if argv[0] != sys.executable:
            self.stop()
            raise RuntimeError(f"the python3 kernel would run {argv[0]}, not {sys.executable}")

    def url(self, path: str, query: str = "") -> str:
        """``path`` on this server, with the token (and ``query``) in the query string."""
        return f"http://127.0.0.1:{self.port}/{path}?{query + '&' if query else ''}token={self.token}"

    api_url = url

    def kernels(self) -> list[dict]:
        with urllib.request.urlopen(self.api_url("api/kernels"), timeout=5) as response:
            return json.load(response)

    def shut_down_kernels(self) -> None:
        """Shut down every kernel this server runs (what Kernel > Shut Down All Kernels does)."""
        for kernel in self.kernels():
            request = urllib.request.Request(self.api_url(f"api/kernels/{kernel['id']}"), method="DELETE")
            urllib.request.urlopen(request, timeout=30).close()

    def stop(self) -> list[str]:
        """Shut the server and its kernels down; kill whatever of its process tree outlived that.

        Returns the command lines of the processes that had to be killed (none, normally).
        """
        process, self.process = self.process, None
        killed: list[str] = []
        if process is not None:
            try:
                tree = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            if process.poll() is None:
                try:  # the API shuts the kernels down first, then the server
                    request = urllib.request.Request(self.api_url("api/shutdown"), method="POST")
                    urllib.request.urlopen(request, timeout=10).close()
                except (urllib.error.URLError, OSError):
                    process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    killed.append(" ".join(process.args))
                    process.kill()
                    process.wait(timeout=5)
            _gone, alive = psutil.wait_procs(tree, timeout=5)
            for p in alive:
                try:
                    killed.append(" ".join(p.cmdline()))
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.base, ignore_errors=True)
        return killed


def open_notebook(page, server: LabServer, name: str, timeout_ms: float = 60_000) -> None:
    """Open ``name`` in Lab and wait until its kernel is idle (connected and started)."""
    # `reset`: a fresh workspace, so the notebook opened by an earlier test is not restored too.
    page.goto(server.url(f"lab/tree/{name}", "reset"), timeout=timeout_ms)
    page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(timeout=timeout_ms)
    wait_kernel_idle(page, timeout_ms)


def wait_kernel_idle(page, timeout_ms: float = 60_000) -> None:
    """Wait until the status bar says the kernel is idle ("Python 3 (ipykernel) | Idle")."""
    page.wait_for_function(
        "() => /\\|\\s*Idle/.test(document.querySelector('#jp-main-statusbar')?.textContent || '')",
        timeout=timeout_ms,
    )


def wait_all_cells_ran(page, timeout_ms: float = 60_000) -> None:
    """Wait until no code cell is running or queued (``[*]``), one has run, and the kernel is idle.

    A cell that raises stops Run All: the cells after it keep an empty prompt, which the caller
    checks (with the traceback) rather than waiting here for counts that never come.
    """
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll(
                '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt')]
                .map(p => p.textContent);
            const idle = /\\|\\s*Idle/.test(
                document.querySelector('#jp-main-statusbar')?.textContent || '');
            return idle && prompts.some(p => /\\[\\d+\\]/.test(p))
                && !prompts.some(p => p.includes('*'));
        }""",
        timeout=timeout_ms,
    )


def run_all_cells(page) -> None:
    """Run > Run All Cells, from the menu bar."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$"))
    page.locator(".lm-Menu-item:visible", has=label).click()


def code_cells(page):
    """The code cells of the notebook on show."""
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell")


def run_cell(page, index: int) -> None:
    """Click into code cell ``index`` (0-based) and run it in place (Ctrl+Enter), as a person re-runs a cell."""
    cell = code_cells(page).nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Control+Enter")


def wait_cell_ran(page, index: int, after: int = 0, timeout_ms: float = 60_000) -> int:
    """Wait until code cell ``index`` shows an execution count above ``after``; return it."""
    prompt = code_cells(page).nth(index).locator(".jp-InputArea-prompt")
    page.wait_for_function(
        """([el, after]) => { const m = el.textContent.match(/\\[(\\d+)\\]/); return m && +m[1] > after; }""",
        arg=[prompt.element_handle(), after], timeout=timeout_ms,
    )
    wait_kernel_idle(page, timeout_ms)
    return int(re.search(r"\[(\d+)\]", prompt.text_content())[1])


def menu(page, top: str, item: str) -> None:
    """Pick ``top > item`` from the menu bar (e.g. Kernel > Interrupt Kernel)."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(rf"^{re.escape(top)}$")).click()
    label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(rf"^{re.escape(item)}$"))
    page.locator(".lm-Menu-item:visible", has=label).click()
