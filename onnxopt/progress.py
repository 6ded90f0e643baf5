"""A progress bar on long loops, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, enabled: bool, desc: str, total: int | None = None,
             unit: str = "batch") -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar when ``enabled`` and stderr is a TTY."""
    if not enabled or not sys.stderr.isatty():
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr)
