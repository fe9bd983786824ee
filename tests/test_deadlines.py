"""Per-attempt time limits sharing one timer: expiry, pass-through of other cancellations, no stray cancels."""

from __future__ import annotations

import asyncio

import pytest

from orchestra.models.deadlines import Deadlines

NEVER_S = 30  # a limit no test reaches: the awaited event is set long before


async def hang() -> str:
    await asyncio.Event().wait()
    return "never"


def test_requests_past_their_limit_time_out_each_and_the_others_finish() -> None:
    async def main() -> list[object]:
        deadlines = Deadlines()
        done = asyncio.Event()

        async def quick() -> str:
            await done.wait()
            return "answered"

        async def staggered(i: int) -> str:
            await asyncio.sleep(0.01 * i)  # started one after another: each is its limit's queue head in turn
            return await deadlines.within(0.05, hang())

        tasks = [asyncio.ensure_future(staggered(i)) for i in range(3)]
        slow_limit = asyncio.ensure_future(deadlines.within(NEVER_S, quick()))
        results: list[object] = list(await asyncio.gather(*tasks, return_exceptions=True))
        done.set()
        results.append(await slow_limit)
        return results

    results = asyncio.run(main())
    assert [type(r) for r in results[:3]] == [asyncio.TimeoutError] * 3
    assert results[3] == "answered"


def test_a_cancellation_from_elsewhere_is_not_a_timeout() -> None:
    async def main() -> None:
        deadlines = Deadlines()
        task = asyncio.ensure_future(deadlines.within(NEVER_S, hang()))
        await asyncio.sleep(0)
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())


def test_a_request_that_finished_in_time_is_never_cancelled_later() -> None:
    async def main() -> list[object]:
        deadlines = Deadlines()

        async def answer() -> str:
            return "in time"

        async def finished_behind_a_slow_one() -> str:
            first = await deadlines.within(0.05, answer())  # done, but queued behind the hanging request
            await asyncio.sleep(0.2)  # past both deadlines: the expiry must skip this task
            return first

        slow = asyncio.ensure_future(deadlines.within(0.05, hang()))
        await asyncio.sleep(0)
        return list(await asyncio.gather(slow, finished_behind_a_slow_one(), return_exceptions=True))

    slow, quick = asyncio.run(main())
    assert isinstance(slow, asyncio.TimeoutError) and quick == "in time"


def test_a_loop_that_stalls_again_and_again_still_cuts_off_a_request_that_never_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stall moves a request's limit on once (an answer may wait unread in its socket); each stall
    longer than what the last one gave moved it again, and a hung request was never cut off."""
    import time

    from orchestra.models import deadlines as module

    monkeypatch.setattr(module, "STALL_S", 0.05)

    async def main() -> object:
        limits = Deadlines()
        waiting = asyncio.ensure_future(limits.within(0.1, hang()))

        async def stall_again_and_again() -> None:
            while not waiting.done():
                time.sleep(0.2)  # the loop runs nothing meanwhile (a blocking write), then turns once
                await asyncio.sleep(0)

        staller = asyncio.ensure_future(stall_again_and_again())
        await asyncio.wait({waiting}, timeout=NEVER_S)
        cut = waiting.exception() if waiting.done() else "still waiting"
        waiting.cancel()
        await staller
        return cut

    assert isinstance(asyncio.run(main()), asyncio.TimeoutError)
