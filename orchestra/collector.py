"""Python's cyclic garbage collector paced for data-set runs.

A full collection walks every object the collector tracks, and while a data set streams that is
mostly the runs in flight (about 140 objects each, a window of 1,000 by default), none of which it
can free: measured on ``bench/scale.py``, full collections took about 40% of the time and freed
0.0015 objects per instance (the runs' objects are freed by reference counting as each run ends).
Python starts one every 10 collections of the middle generation (there, every ~250 instances);
while a stream runs, Orchestra asks for one every ``FULL_COLLECTION_SPACING`` of them instead, and
gives the setting back when the last stream in the process ends. Young objects are collected as
before, so short-lived cycles still go at once; what the older cycles hold waits longer, no more
than a full collection's spacing of allocations, whatever the data set's size.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from orchestra.errors import ConfigError

#: middle-generation collections per full collection while a stream runs (Python's default is 10);
#: None leaves the collector as it is. Read as each stream starts.
FULL_COLLECTION_SPACING: int | None = 1000

_lock = threading.Lock()
_streams = 0  # streams running in this process (in any thread)
_given_back: tuple[int, int, int] | None = None  # the thresholds to restore when the last one ends
_ours: tuple[int, int, int] | None = None  # the thresholds set here (kept only while still in force)


@contextmanager
def paced_for_streams() -> Iterator[None]:
    """Space full collections ``FULL_COLLECTION_SPACING`` apart while the block runs (streams
    nest and overlap: the first to start sets it, the last to end restores it). Left alone: a
    collector switched off or with thresholds set to collect even less often, and thresholds
    someone else changes meanwhile (not restored over theirs)."""
    _start()
    try:
        yield
    finally:
        _end()


def _start() -> None:
    global _streams, _given_back, _ours
    spacing = FULL_COLLECTION_SPACING
    if spacing is not None and (type(spacing) is not int or spacing < 1):  # (checked before it counts the stream)
        raise ConfigError(f"orchestra.collector.FULL_COLLECTION_SPACING must be a whole number of at least 1 "
                          f"or None (pacing off), not {spacing!r}")
    with _lock:
        _streams += 1
        if _streams > 1 or spacing is None or not gc.isenabled():
            return
        young, middle, full = gc.get_threshold()
        if young == 0 or full >= spacing:  # (a first threshold of 0 switches collection off)
            return
        _given_back, _ours = (young, middle, full), (young, middle, spacing)
        gc.set_threshold(*_ours)


def _end() -> None:
    global _streams, _given_back, _ours
    with _lock:
        _streams -= 1
        if _streams or _given_back is None:
            return
        if gc.get_threshold() == _ours:
            gc.set_threshold(*_given_back)
        _given_back = _ours = None
