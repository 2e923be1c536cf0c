"""The daemon's Workers stood in for: each job runs inline, on the caller's thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from thinwatchd.daemon.daemon import Threads


class InlineWorkers:
    """Stands in for the daemon's reconcile Workers: each job runs at once on the caller's
    thread and its result reaches done before submit returns, so a test sees a pass's growths
    done when the pass returns. The daemon's threads, side by side, are
    tests/engine/test_concurrency.py's."""

    def __init__(self, loop: object = None) -> None:
        self._running: set[str] = set()

    def busy(self, key: str) -> bool:
        return key in self._running

    def keys(self) -> list[str]:
        return list(self._running)

    def hurry(self, key: str) -> bool:
        return False  # nothing ever waits for a thread here

    def submit(
        self, key: str, job: Callable[[], Any], done: Callable[..., None], background: bool = False
    ) -> bool:
        if key in self._running:
            return False
        self._running.add(key)
        result: Any = None
        error: BaseException | None = None
        try:
            result = job()
        except BaseException as exc:  # delivered to done, as Workers does
            error = exc
        finally:
            self._running.discard(key)
        done(result, error)
        return True

    def run_until_idle(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


#: The daemon's threads as the engine tests and the scale bench run them: reconciles and the
#: jobs on pool files inline, so a pass's growths are done when it returns; builds in worker
#: threads. tests/engine/test_concurrency.py runs the daemon's own threads.
INLINE = Threads(reconciles=InlineWorkers, files=InlineWorkers)
