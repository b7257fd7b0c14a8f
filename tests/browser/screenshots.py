"""Refresh the README's widget screenshots (docs/images/widget_running.png, widget_finished.png).

Runs the browser test that takes them, with ``MODAL_MAGIC_UPDATE_SCREENSHOTS=1`` so that it copies
them from tests/artifacts/ to docs/images/. Needs what ``make test`` installs (Chromium, JupyterLab,
Playwright)::

    .venv/bin/python tests/browser/screenshots.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    env = dict(os.environ, MODAL_MAGIC_UPDATE_SCREENSHOTS="1")
    return subprocess.call(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_browser.py::test_widget_live_then_finished_with_failures"],
        cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
