"""Run a notebook headless with a real IPython kernel and say what its modal_magic runs did.

A development tool, not part of the package (it needs nbclient, a test dependency). ``make demo``
(``python -m tests.notebook_runner notebooks/quickstart.ipynb``) and the notebook tests both go
through :func:`execute_notebook`: nbclient executes every cell in a kernel started from this
interpreter (never whatever ``python3`` kernelspec a user directory happens to hold), stores the
widget state the progress bars left, writes the executed notebook next to the source, and reads each
run's summary line back out of the static HTML each finished bar leaves as its output.
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ProgressRun", "execute_notebook", "progress_runs"]

WIDGET_STATE_KEY = "application/vnd.jupyter.widget-state+json"
_VIEW = "application/vnd.jupyter.widget-view+json"


@dataclass(frozen=True)
class ProgressRun:
    """One finished progress bar found in an executed notebook's outputs."""

    title: str  # the result column the run filled
    value: int  # the bar's value (rows finished)
    total: int  # the bar's maximum
    bar_style: str  # "success", "warning" (some rows failed) or "danger" (stopped)
    counts: str  # the counts line, as last drawn
    summary: str  # the summary line shown when the run ended


def execute_notebook(path: str | Path, *, output_path: str | Path | None = None,
                     timeout: int = 600) -> tuple[Path, str]:
    """Execute every cell of the notebook at ``path``; return the executed copy's path and a summary.

    Cells run with the notebook's folder as working directory. The executed notebook (outputs and
    widget state included) is written to ``output_path``, by default ``NAME.executed.ipynb`` next to
    the source, also when a cell fails, so the failure can be looked at.

    Raises
    ------
    nbclient.exceptions.CellExecutionError
        When a cell raises; the message holds the cell's traceback.

    Examples
    --------
    >>> executed, summary = execute_notebook("notebooks/quickstart.ipynb")  # doctest: +SKIP
    >>> print(summary)  # doctest: +SKIP
    Executed notebooks/quickstart.ipynb: 17 cells in 9.1s
      sentiment: Done with failures: 3,000 rows in 1.2s (2,480 rows/s) | 2,994 succeeded, ...
    """
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    import zmq
    from nbclient import NotebookClient

    path = Path(path)
    output_path = Path(output_path) if output_path is not None else path.with_suffix(".executed.ipynb")
    nb = nbformat.read(path, as_version=4)
    # No kernel directories: only ipykernel's own spec is left, and it runs sys.executable.
    specs = KernelSpecManager(kernel_dirs=[])
    km = KernelManager(kernel_name="python3", kernel_spec_manager=specs,
                       transport_encryption="auto" if zmq.has("curve") else "disabled")
    client = NotebookClient(nb, km=km, timeout=timeout, store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    started = time.perf_counter()
    try:
        client.execute()
        elapsed = time.perf_counter() - started
    finally:
        nbformat.write(nb, output_path)
        if km.has_kernel:  # given its kernel manager, nbclient leaves the kernel running
            km.shutdown_kernel(now=False)
    code_cells = sum(cell.cell_type == "code" for cell in nb.cells)
    lines = [f"Executed {path}: {code_cells} code cells in {elapsed:.1f}s"]
    lines += [f"  {run.title}: {run.summary}" for run in progress_runs(nb)]
    return output_path, "\n".join(lines)


def progress_runs(nb: Any) -> list[ProgressRun]:
    """The modal_magic progress bars an executed notebook shows, in the order its cells show them.

    Read from what the saved notebook holds for each finished run: the static ``text/html`` that
    replaces the live widget when the run ends (what JupyterLab without a kernel, GitHub and
    nbviewer render). A bar still live when the notebook was saved (a widget view) is left out.
    """
    runs = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            page = output.get("data", {}).get("text/html", "")
            if "modal-magic-progress" not in page:
                continue
            title = re.search(r'<span class="modal-magic-title"[^>]*>(.*?)</span>', page)
            style = re.search(r'class="progress-bar progress-bar-(\w+)"', page)
            counts = html.unescape(_div(page, "modal-magic-counts"))
            numbers = re.search(r"([\d,]+)/([\d,]+) rows", counts)  # after a status (live dollars), if any
            runs.append(ProgressRun(
                title=html.unescape(title.group(1)) if title else "",
                value=int(numbers.group(1).replace(",", "")) if numbers else 0,
                total=int(numbers.group(2).replace(",", "")) if numbers else 0,
                bar_style=style.group(1) if style else "",
                counts=counts,
                summary=html.unescape(_div(page, "modal-magic-summary-line")),
            ))
    return runs


def _div(page: str, css: str) -> str:
    match = re.search(rf'<div class="{css}">(.*?)</div>', page)
    return match.group(1) if match else ""


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.notebook_runner NOTEBOOK...``: execute each notebook, print what it ran."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("notebooks", nargs="+", type=Path)
    for notebook in parser.parse_args(argv).notebooks:
        print(f"\nRunning {notebook} headless with a real kernel...", flush=True)
        executed, summary = execute_notebook(notebook)
        print(summary)
        print(f"Executed notebook: {executed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
