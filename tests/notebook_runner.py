"""Run a notebook headless with a real IPython kernel and say what its modal_magic runs did.

A development tool, not part of the package (it needs nbclient, a test dependency). ``make demo``
(``python -m tests.notebook_runner notebooks/quickstart.ipynb``) and the notebook tests both go
through :func:`execute_notebook`: nbclient executes every cell in a kernel started from this
interpreter (never whatever ``python3`` kernelspec a user directory happens to hold), stores the
widget state the progress bars left, writes the executed notebook next to the source, and reads each
run's summary line back out of that widget state.
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
    """One progress bar found in an executed notebook's widget state."""

    title: str  # the result column the run filled
    value: int  # the bar's value (rows finished)
    total: int  # the bar's maximum
    bar_style: str  # "success", "warning" (some rows failed) or "danger" (stopped)
    counts: str  # the live counts line, as last drawn
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

    The bars' state comes from the notebook's stored widget state; the order from the widget views
    in the cells' outputs (the stored state itself is not kept in creation order).
    """
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE_KEY, {}).get("state", {})
    shown = [output["data"][_VIEW]["model_id"] for cell in nb.cells if cell.cell_type == "code"
             for output in cell.outputs if _VIEW in output.get("data", {})]
    runs = []
    for model_id in shown:
        root = state.get(model_id, {}).get("state", {})
        if "modal-magic-progress" not in root.get("_dom_classes", ()):
            continue
        parts = _parts_by_class(state, root)
        runs.append(ProgressRun(
            title=html.unescape(parts["modal-magic-title"]["value"]),
            value=parts["modal-magic-bar"]["value"],
            total=parts["modal-magic-bar"]["max"],
            bar_style=parts["modal-magic-bar"]["bar_style"],
            counts=html.unescape(parts["modal-magic-counts"]["value"]),
            summary=_summary_line(parts["modal-magic-summary"]["value"]),
        ))
    return runs


def _parts_by_class(state: dict[str, Any], root: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The widgets under ``root`` (any depth), by their ``modal-magic-*`` CSS class."""
    parts: dict[str, dict[str, Any]] = {}
    pending = list(root.get("children", ()))
    while pending:
        model = state.get(pending.pop().removeprefix("IPY_MODEL_"), {}).get("state", {})
        parts.update((css, model) for css in model.get("_dom_classes", ()) if css.startswith("modal-magic-"))
        pending += model.get("children", ())
    return parts


def _summary_line(value: str) -> str:
    match = re.search(r'<div class="modal-magic-summary-line">(.*?)</div>', value)
    return html.unescape(match.group(1)) if match else ""


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
