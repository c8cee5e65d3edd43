"""Coalescing concurrent requests into shared model calls."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ctr.serving.coalesce import DEADLINE, BatchCost, Coalescer, dispatch_delay


class Model:
    """Doubles its input; each call blocks until released, so batching is observable."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.release = asyncio.Event()
        self.active = 0
        self.max_active = 0

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        await self.release.wait()
        self.active -= 1
        return x[:, 0] * 2.0


def rows(i: int, n: int) -> np.ndarray:
    return np.full((n, 3), i, dtype=np.int64)


def test_requests_arriving_while_busy_share_one_call() -> None:
    """With one call in flight, the next eight requests go out together in one call."""

    async def go() -> None:
        model = Model()
        c = Coalescer(model, max_inflight=1)
        first = asyncio.create_task(c.submit(rows(0, 2)))
        await asyncio.sleep(0)
        rest = [asyncio.create_task(c.submit(rows(i, 3))) for i in range(1, 9)]
        await asyncio.sleep(0)
        model.release.set()
        results = await asyncio.gather(first, *rest)
        assert model.calls == [2, 24]
        for i, r in enumerate(results):  # each caller gets exactly its own rows back
            assert list(r) == [2.0 * i] * (2 if i == 0 else 3)

    asyncio.run(go())


def test_inflight_limit_and_max_rows() -> None:
    """Never more than max_inflight calls at once, never more than max_rows per call."""

    async def go() -> None:
        model = Model()
        c = Coalescer(model, max_inflight=2, max_rows=10)
        tasks = [asyncio.create_task(c.submit(rows(i, 4))) for i in range(10)]
        await asyncio.sleep(0)
        model.release.set()
        await asyncio.gather(*tasks)
        assert model.max_active <= 2
        assert max(model.calls) <= 10 and sum(model.calls) == 40

    asyncio.run(go())


def test_model_errors_reach_every_caller_of_the_batch() -> None:
    """A failing call fails its callers (who fall back); the coalescer keeps working."""

    async def go() -> None:
        fail = True

        async def model(x: np.ndarray) -> np.ndarray:
            if fail:
                raise OSError("model down")
            return x[:, 0].astype(float)

        c = Coalescer(model, max_inflight=1)
        results = await asyncio.gather(c.submit(rows(1, 1)), c.submit(rows(2, 1)), return_exceptions=True)
        assert all(isinstance(r, OSError) for r in results)
        fail = False
        assert list(await c.submit(rows(3, 1))) == [3.0]

    asyncio.run(go())


def test_abandoned_requests_are_skipped() -> None:
    """A request whose caller gave up (deadline) is not sent to the model."""

    async def go() -> None:
        model = Model()
        c = Coalescer(model, max_inflight=1)
        first = asyncio.create_task(c.submit(rows(0, 1)))
        await asyncio.sleep(0)
        late = asyncio.create_task(c.submit(rows(1, 5)))
        await asyncio.sleep(0)
        late.cancel()
        kept = asyncio.create_task(c.submit(rows(2, 1)))
        await asyncio.sleep(0)
        model.release.set()
        await asyncio.gather(first, kept)
        assert model.calls == [1, 1]

    asyncio.run(go())


@pytest.mark.parametrize("kwargs", [{"max_inflight": 0}, {"max_rows": 0}, {"window_s": -1.0}])
def test_rejects_bad_config(kwargs: dict[str, float]) -> None:
    """Impossible settings are refused with a message naming the setting."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Coalescer(Model(), **kwargs)  # type: ignore[arg-type]


# --- the deadline-aware window (CTR_BATCH_WINDOW=deadline), on an injected clock --------
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def deadline_coalescer(model: Model, on_the_way: list[int], clock: Clock, cost_s: float | None = 0.002) -> Coalescer:
    cost = BatchCost()
    if cost_s is not None:  # a line through both: setup cost_s, 0.1 ms a row
        cost.observe(4, cost_s + 0.0004)
        cost.observe(16, cost_s + 0.0016)
    return Coalescer(model, 2, 64, window="deadline", clock=clock, expected=lambda: on_the_way[0], cost=cost)


def submit(c: Coalescer, x: np.ndarray, deadline: float) -> asyncio.Task[np.ndarray]:
    DEADLINE.set(deadline)
    return asyncio.create_task(c.submit(x))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("on_the_way", [0, 3])
def test_a_lone_request_goes_at_once(on_the_way: int) -> None:
    """Nothing else on its way (c=1): the call starts at once; also before any call was measured."""

    async def go() -> None:
        model, clock = Model(), Clock()
        c = deadline_coalescer(model, [on_the_way], clock, cost_s=0.002 if on_the_way == 0 else None)
        t = submit(c, rows(1, 4), 0.050)
        await settle()
        assert model.calls == [4]
        model.release.set()
        await t

    asyncio.run(go())


def test_it_waits_while_the_slack_allows_then_goes_with_its_company() -> None:
    """Another request on its way and slack left: the first waits (a call's setup at most);
    when the other arrives and nothing more is coming, both go in one call."""

    async def go() -> None:
        model, clock, on_the_way = Model(), Clock(), [1]
        c = deadline_coalescer(model, on_the_way, clock)
        first = submit(c, rows(1, 4), 0.050)
        await settle()
        assert model.calls == [] and c.delay() == pytest.approx(0.002)
        clock.t = 0.0005
        on_the_way[0] = 0
        second = submit(c, rows(2, 4), 0.050)
        await settle()
        assert model.calls == [8]
        model.release.set()
        assert list(await first) == [2.0] * 4 and list(await second) == [4.0] * 4

    asyncio.run(go())


def test_it_never_waits_past_the_earliest_deadline_minus_the_cost() -> None:
    """The earliest waiting deadline bounds the wait: it goes at that deadline minus the
    estimated cost of the call, however much company is still on its way."""

    async def go() -> None:
        model, clock, on_the_way = Model(), Clock(), [1]  # 12 rows then: 3.2 ms of cost
        c = deadline_coalescer(model, on_the_way, clock)
        late = submit(c, rows(1, 4), 0.050)
        await settle()
        clock.t = 0.0010
        urgent = submit(c, rows(2, 4), 0.0050)  # due at 5 ms, 3.2 ms of cost: 0.8 ms more at most
        await settle()
        assert model.calls == [] and c.delay() == pytest.approx(0.0050 - 0.0032 - 0.0010)
        clock.t = 0.0018
        assert c.delay() <= 0
        third = submit(c, rows(3, 4), 0.050)  # any event re-evaluates; the timer would too
        await settle()
        assert model.calls == [12]
        model.release.set()
        await asyncio.gather(late, urgent, third)

    asyncio.run(go())


def test_a_full_batch_goes_at_once() -> None:
    """max_rows waiting: no reason to wait for more."""

    async def go() -> None:
        model, clock = Model(), Clock()
        c = deadline_coalescer(model, [9], clock)
        t = submit(c, rows(1, 64), 0.050)
        await settle()
        assert model.calls == [64]
        model.release.set()
        await t

    asyncio.run(go())


@pytest.mark.parametrize(
    ("now", "deadline", "first", "cost", "gain", "expected"),
    [
        (0.0, 0.050, 0.0, 0.004, 0.002, 0.002),  # slack: wait what a shared call saves
        (0.001, 0.050, 0.0, 0.004, 0.002, 0.001),
        (0.0, 0.005, 0.0, 0.004, 0.002, 0.001),  # the deadline binds first
        (0.0, 0.003, 0.0, 0.004, 0.002, -0.001),  # already too late to wait: go now
        (0.0, 0.050, 0.0, 0.004, 0.0, 0.0),  # nothing to save (one size measured): go now
        (0.0, 0.050, 0.0, None, 0.002, 0.0),  # no call measured yet: go now
    ],
)
def test_dispatch_delay(
    now: float, deadline: float, first: float, cost: float | None, gain: float, expected: float
) -> None:
    """The rule: min(earliest deadline - cost, first arrival + setup saved) - now."""
    assert dispatch_delay(now, deadline, first, cost, gain) == pytest.approx(expected)


def test_batch_cost_is_an_ewma_per_row_bucket_and_a_line_through_them() -> None:
    """None before a call; an EWMA per power-of-two bucket; one bucket scales up by rows and
    saves nothing known; two give the line setup + rows x per-row."""
    cost = BatchCost(alpha=0.5)
    assert cost.estimate(100) is None and cost.setup_s() == 0.0
    cost.observe(100, 0.002)
    cost.observe(120, 0.004)  # same bucket (64-127): (110 rows, 3 ms)
    assert cost.estimate(100) == pytest.approx(0.003)
    assert cost.estimate(440) == pytest.approx(0.012) and cost.estimate(10) == pytest.approx(0.003)
    assert cost.setup_s() == 0.0
    cost.observe(1000, 0.012)  # (110, 3 ms) and (1000, 12 ms): setup 1.888 ms, 10.1 us a row
    assert cost.setup_s() == pytest.approx(0.003 - 110 * 0.009 / 890)
    assert cost.estimate(300) == pytest.approx(cost.setup_s() + 300 * 0.009 / 890)
