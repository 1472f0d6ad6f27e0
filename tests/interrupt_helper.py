"""Shared by the resume tests (not a test module): cut a training run short at a chosen batch, as a crash would."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest


class Interrupt(Exception):
    """Raised by a source's stream at the cut; stands for a killed process."""


@contextlib.contextmanager
def dies_after(source: Any, after: int, delay: float = 0.0) -> Iterator[Any]:
    """Within the block, ``source.batches`` raises :class:`Interrupt` when batch ``after`` is asked for (the run's
    checkpoints up to then exist); ``delay`` seconds of sleep before each batch handed out. Restored on exit."""
    orig = source.batches

    def dying(*a, **kw):
        for i, item in enumerate(orig(*a, **kw)):
            if i == after:
                raise Interrupt
            if delay:
                time.sleep(delay)
            yield item

    source.batches = dying
    try:
        yield source
    finally:
        source.batches = orig


def run_cut_short(run: Callable[[], Any], source: Any, after: int, delay: float = 0.0) -> None:
    """Call ``run()`` (a training on ``source``) with the stream dying at batch ``after``; the cut must happen."""
    with dies_after(source, after, delay), pytest.raises(Interrupt):
        run()
