"""Full garbage collections spaced out while data sets stream, and the collector given back as it was."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from contextlib import aclosing

import pytest
from helpers import scripted_pool

from orchestra import Orchestra, collector, serve
from orchestra.errors import ConfigError

PYTHONS = (700, 10, 10)  # Python's own thresholds
SPACED = (700, 10, collector.FULL_COLLECTION_SPACING)  # while a stream runs


@pytest.fixture(autouse=True)
def pythons_collector() -> Iterator[None]:
    """Each test starts from Python's thresholds with collection on, and leaves the process as it was."""
    before, enabled = gc.get_threshold(), gc.isenabled()
    gc.set_threshold(*PYTHONS)
    gc.enable()
    yield
    gc.set_threshold(*before)
    if not enabled:
        gc.disable()


def orchestra() -> Orchestra:
    pool, _ = scripted_pool(2)
    return Orchestra(pool, k=1, mode="topk", aggregate="none", store=False)


async def thresholds_seen(orc: Orchestra, n: int = 3, *, window: int = 2) -> list[tuple[int, int, int]]:
    """The collector's thresholds as each result of a stream of ``n`` tasks is handed over."""
    return [gc.get_threshold() async for _ in orc.arun_iter([f"question {i}" for i in range(n)], window=window)]


def test_a_stream_spaces_full_collections_and_gives_pythons_thresholds_back() -> None:
    seen = asyncio.run(thresholds_seen(orchestra()))
    assert seen == [SPACED] * 3 and SPACED[2] == 1000
    assert gc.get_threshold() == PYTHONS
    assert orchestra().run_many(["question"])[0].status == "done"  # (run_many streams too)
    assert gc.get_threshold() == PYTHONS


def test_overlapping_streams_keep_the_spacing_until_the_last_one_ends() -> None:
    async def main() -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        short = asyncio.ensure_future(thresholds_seen(orchestra(), 1))
        long = await thresholds_seen(orchestra(), 6, window=1)  # (still streaming when the short one ends)
        return await short, long

    short, long = asyncio.run(main())
    assert short == [SPACED] and long == [SPACED] * 6
    assert gc.get_threshold() == PYTHONS


def test_a_stream_left_early_or_failing_gives_the_thresholds_back() -> None:
    async def leave_early() -> None:
        async with aclosing(orchestra().arun_iter([f"question {i}" for i in range(5)], window=2)) as stream:
            async for _ in stream:
                assert gc.get_threshold() == SPACED
                break

    def failing_input() -> Iterator[str]:
        yield "question"
        raise ValueError("the data set broke")

    async def fail() -> None:
        async for _ in orchestra().arun_iter(failing_input(), window=1):
            assert gc.get_threshold() == SPACED

    asyncio.run(leave_early())
    assert gc.get_threshold() == PYTHONS
    with pytest.raises(ValueError, match="the data set broke"):
        asyncio.run(fail())
    assert gc.get_threshold() == PYTHONS


def test_a_collector_set_by_the_user_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    gc.set_threshold(700, 10, 5000)  # collecting less often already
    assert asyncio.run(thresholds_seen(orchestra())) == [(700, 10, 5000)] * 3
    gc.set_threshold(0)  # collection switched off by its first threshold
    assert asyncio.run(thresholds_seen(orchestra(), 1))[0][0] == 0
    gc.set_threshold(*PYTHONS)
    gc.disable()
    assert asyncio.run(thresholds_seen(orchestra(), 1)) == [PYTHONS] and not gc.isenabled()
    gc.enable()
    monkeypatch.setattr(collector, "FULL_COLLECTION_SPACING", None)  # the way to turn the pacing off
    assert asyncio.run(thresholds_seen(orchestra(), 1)) == [PYTHONS]


def test_thresholds_changed_during_a_stream_are_kept_after_it() -> None:
    async def main() -> None:
        async for _ in orchestra().arun_iter(["question"], window=1):
            gc.set_threshold(1000, 20, 30)

    asyncio.run(main())
    assert gc.get_threshold() == (1000, 20, 30)


def test_a_spacing_changed_while_a_stream_runs_leaves_the_first_streams_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    with collector.paced_for_streams():
        monkeypatch.setattr(collector, "FULL_COLLECTION_SPACING", 2000)
        with collector.paced_for_streams():
            assert gc.get_threshold() == SPACED
        assert gc.get_threshold() == SPACED
    assert gc.get_threshold() == PYTHONS


def test_a_served_app_spaces_full_collections_while_it_runs() -> None:
    pool, _ = scripted_pool(2)
    application = serve.app(pool, store=False)

    async def main() -> tuple[int, int, int]:
        async with application.router.lifespan_context(application):
            return gc.get_threshold()

    assert asyncio.run(main()) == SPACED
    assert gc.get_threshold() == PYTHONS


@pytest.mark.parametrize("spacing", ["1000", 0, -5, 2.5, True])
def test_a_spacing_that_is_not_a_whole_number_is_refused_and_leaves_later_streams_paced(
        monkeypatch: pytest.MonkeyPatch, spacing: object) -> None:
    monkeypatch.setattr(collector, "FULL_COLLECTION_SPACING", spacing)
    with pytest.raises(ConfigError, match=r"FULL_COLLECTION_SPACING must be a whole number .*not " + repr(spacing)):
        asyncio.run(thresholds_seen(orchestra(), 1))
    assert gc.get_threshold() == PYTHONS
    monkeypatch.setattr(collector, "FULL_COLLECTION_SPACING", 1000)
    assert asyncio.run(thresholds_seen(orchestra(), 1)) == [SPACED]  # (the refused stream was never counted)
    assert gc.get_threshold() == PYTHONS
