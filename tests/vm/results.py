"""Where each ``run`` keeps its returned files on the host."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from tests.vm.paths import RUNS_DIR

__all__ = ["KEEP_RUNS", "new_results_dir"]

KEEP_RUNS = 10
"""How many default results folders survive; older ones are removed."""


def new_results_dir(label: str, requested: Path | None = None) -> Path:
    """Return a fresh, not yet existing folder for one run's files.

    ``requested`` (``--out``) is used if given and absent or empty; otherwise a new folder
    under ``.cache/vm/runs`` is named, and the oldest default folders are pruned.
    """
    if requested is not None:
        if requested.exists():
            if any(requested.iterdir()):
                raise FileExistsError(f"{requested} exists and is not empty")
            requested.rmdir()
        requested.parent.mkdir(parents=True, exist_ok=True)
        return requested
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    _prune(RUNS_DIR, KEEP_RUNS - 1)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return RUNS_DIR / f"{stamp}-{label}-{os.getpid()}"


def _prune(folder: Path, keep: int) -> None:
    runs = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in runs[: max(0, len(runs) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
