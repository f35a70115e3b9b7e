"""What a recipe reload needs besides loading: noticing changed files, and finding stale pins.

:class:`RecipeWatcher` polls the files and folders the recipes came from and calls back when one
changes. :func:`stale_pins` tells which stored pins no recipe defines any more, so that a reload
gives their quota back instead of holding it for good.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from ..segment import Pin

log = logging.getLogger(__name__)


class RecipeWatcher:
    """Polls the recipe files for changes and calls ``on_change`` (in a thread of its own).

    Watches the recipe paths the server was given (each named file, each named folder and its
    entries, so added and removed files count) and the files and folders of the last good load
    (parents, included files and their folders).
    """

    def __init__(
        self, recipe_paths: Iterable[Path], interval: float | None, on_change: Callable[[], object]
    ):
        self.recipe_paths = list(recipe_paths)
        self.interval = interval
        self.on_change = on_change
        self._watched: set[Path] = set()
        self._seen: dict[Path, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, paths: set[Path]) -> None:
        """Watch ``paths`` (those of the recipes just loaded) from their present state on."""
        self._watched = set(paths)
        self._seen = self.snapshot()

    def snapshot(self) -> dict[Path, tuple[int, int]]:
        """Modification time and size of every watched file and folder."""
        paths = set(self._watched)
        for arg in self.recipe_paths:
            paths.add(arg.absolute())
            if arg.is_dir():
                paths.update(p.absolute() for p in arg.iterdir())
        return {path: _stat(path) for path in paths}

    def start(self) -> None:
        """Poll every ``interval`` seconds in the background (nothing without an interval)."""
        if not self.interval or not self.recipe_paths or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="prefixcache-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        assert self.interval
        while not self._stop.wait(self.interval):
            try:
                now = self.snapshot()
                if now != self._seen:
                    # Remembered before reloading: a broken recipe is retried on its next
                    # change (or SIGHUP), not every interval.
                    self._seen = now
                    self.on_change()
            except Exception:  # the watcher must outlive any one bad reload
                log.exception("recipe watcher")


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


def stale_pins(
    pins: Iterable[Pin], defined: Collection[tuple[str, str]], manages: Callable[[str], bool]
) -> list[Pin]:
    """The pins that came from a recipe this server manages and that no recipe defines now.

    ``defined`` holds ``(source, name)`` for each recipe now loaded on the pins' model; a pin
    whose recipe file was deleted, renamed, or no longer defines it by that name (or on that
    model) is stale. Pins from elsewhere (``manages(source)`` false: ``prefixcache pin``, a
    recipe prewarmed from another folder, another host's recipes in a shared store) are left.
    """
    return [p for p in pins if manages(p.source) and (p.source, p.name) not in defined]


__all__ = ["RecipeWatcher", "stale_pins"]
