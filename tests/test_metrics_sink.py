"""server/metrics.py ``Sink``: group commit towards the MetricsDeployment. The deployment's handle is
a recorder with a slow ``push`` (the thing under test is the sink: which ops go in which push, and
when each flush returns)."""
from __future__ import annotations

import asyncio

from server import metrics


class _Push:
    def __init__(self, delay: float):
        self.delay = delay
        self.calls: list[list] = []

    def remote(self, ops, kind, replica, values):
        async def call():
            await asyncio.sleep(self.delay)
            self.calls.append(list(ops))
        return call()


class _Handle:
    def __init__(self, delay: float = 0.05):
        self.push = _Push(delay)


def _sink(delay: float = 0.05) -> tuple[metrics.Sink, _Handle]:
    sink, handle = metrics.Sink(), _Handle(delay)
    sink.connect(handle, "ingress", "r1")
    return sink, handle


def test_requests_finishing_together_share_pushes_and_each_flush_waits_for_its_own_ops():
    async def main():
        sink, handle = _sink()

        async def request(i: int) -> int:
            sink.add("inc", metrics.REQUESTS, ("none", 200), 1)
            await sink.flush()
            # What this request observed has been pushed when its flush returns.
            return sum(len(ops) for ops in handle.push.calls)

        seen = await asyncio.gather(*(request(i) for i in range(16)))
        await asyncio.sleep(0.2)  # the deferred flushes of `add` find nothing new
        return seen, handle.push.calls

    seen, calls = asyncio.run(main())
    assert sum(len(ops) for ops in calls) == 16
    assert len(calls) <= 3, [len(c) for c in calls]
    assert all(n >= i + 1 for i, n in enumerate(sorted(seen)))


def test_flush_without_news_sends_nothing_and_a_report_change_is_news():
    async def main():
        sink, handle = _sink(delay=0)
        await sink.flush()
        assert handle.push.calls == []
        sink.set_report({"in_flight": {"none": 1}})
        await sink.flush()
        assert handle.push.calls == [[]]
        await asyncio.sleep(0.1)
        await sink.flush()
        return handle.push.calls

    assert asyncio.run(main()) == [[]]


def test_a_cancelled_flush_does_not_lose_ops():
    async def main():
        sink, handle = _sink(delay=0.05)
        sink.add("inc", metrics.REQUESTS, ("none", 499), 1)
        task = asyncio.create_task(sink.flush())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.2)
        return handle.push.calls

    assert sum(len(ops) for ops in asyncio.run(main())) == 1
