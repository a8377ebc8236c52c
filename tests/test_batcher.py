"""The batching contract, made deterministic by a model function that waits on an Event.

The model function here is a real function run by the real batcher on its worker thread; it
answers a one-hot vector of (first pixel mod 10) so every test can check that each request got
back the rows of its own images, in order.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from server.batcher import DynamicBatcher
from server.errors import DeadlineExceeded, ModelFailed, ResourceExhausted, Unavailable
from server.metrics import ServerMetrics
from tests.conftest import until

VERSION = 7
POISON = 13  # a batch holding an image with this first pixel makes the model raise


class GatedModel:
    """Records each call's batch size; blocks each call until the test releases it."""

    def __init__(self, gated: bool = True) -> None:
        self.calls: list[int] = []
        self.entered = threading.Semaphore(0)
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        self.calls.append(len(images))
        self.entered.release()
        assert self.gate.wait(10), "test never released the model"
        if (images[:, 0, 0] == POISON).any():
            raise RuntimeError("boom")
        probs = np.zeros((len(images), 10), np.float32)
        probs[np.arange(len(images)), images[:, 0, 0].astype(np.int64) % 10] = 1.0
        return probs, VERSION

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.acquire, True, 10), "model was not called"


def images(*first_pixels: int) -> np.ndarray:
    out = np.zeros((len(first_pixels), 28, 28), np.uint8)
    out[:, 0, 0] = first_pixels
    return out


def digits(result: tuple[np.ndarray, np.ndarray]) -> list[int]:
    return result[0].argmax(axis=1).tolist()


async def started(model: GatedModel, **kw: float) -> DynamicBatcher:
    params = {"max_batch_size": 4, "max_queue_images": 64, **kw}
    batcher = DynamicBatcher(
        model,
        max_batch_size=int(params["max_batch_size"]),
        max_queue_images=int(params["max_queue_images"]),
        batch_timeout_s=float(params.get("batch_timeout_s", 0.0)),
        metrics=ServerMetrics(),
    )
    batcher.start()
    return batcher


async def settle() -> None:
    """Let queued callbacks run (submit tasks reach the queue)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_idle_request_runs_at_once_and_gets_its_rows() -> None:
    model = GatedModel(gated=False)
    batcher = await started(model)
    result = await batcher.submit(images(3))
    assert digits(result) == [3]
    assert result[1].tolist() == [VERSION]
    assert model.calls == [1]
    await batcher.stop()


async def test_requests_arriving_while_busy_share_the_next_call() -> None:
    model = GatedModel()
    batcher = await started(model, max_batch_size=16)
    first = asyncio.create_task(batcher.submit(images(1)))
    await model.wait_entered()  # model busy with [1]
    rest = [asyncio.create_task(batcher.submit(images(d))) for d in (2, 3, 4, 5, 6)]
    await settle()
    assert batcher.queued_images == 5
    model.gate.set()
    assert digits(await first) == [1]
    assert [digits(await t) for t in rest] == [[2], [3], [4], [5], [6]]
    assert model.calls == [1, 5]  # the 5 waiting requests flushed as one batch
    await batcher.stop()


async def test_full_batches_are_capped_at_max_batch_size() -> None:
    model = GatedModel()
    batcher = await started(model, max_batch_size=4)
    first = asyncio.create_task(batcher.submit(images(0)))
    await model.wait_entered()
    rest = [asyncio.create_task(batcher.submit(images(d % 10))) for d in range(10)]
    await settle()
    model.gate.set()
    await first
    assert [digits(await t)[0] for t in rest] == list(range(10))
    assert model.calls == [1, 4, 4, 2]
    await batcher.stop()


async def test_large_request_is_split_and_reassembled_in_order() -> None:
    model = GatedModel(gated=False)
    batcher = await started(model, max_batch_size=4)
    pixels = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    result = await batcher.submit(images(*pixels))
    assert digits(result) == pixels
    assert model.calls == [4, 4, 2]
    await batcher.stop()


async def test_split_request_shares_batches_with_neighbours_fifo() -> None:
    model = GatedModel()
    batcher = await started(model, max_batch_size=4)
    blocker = asyncio.create_task(batcher.submit(images(0)))
    await model.wait_entered()
    a = asyncio.create_task(batcher.submit(images(1, 1, 1)))
    b = asyncio.create_task(batcher.submit(images(2, 3, 4, 5, 6, 7)))
    c = asyncio.create_task(batcher.submit(images(8)))
    await settle()
    model.gate.set()
    await blocker
    assert digits(await a) == [1, 1, 1]
    assert digits(await b) == [2, 3, 4, 5, 6, 7]
    assert digits(await c) == [8]
    assert model.calls == [1, 4, 4, 2]  # [a3+b1] [b4] [b1+c1]
    await batcher.stop()


async def test_failed_call_fails_every_request_in_it_and_serving_continues() -> None:
    model = GatedModel()
    batcher = await started(model, max_batch_size=8)
    blocker = asyncio.create_task(batcher.submit(images(0)))
    await model.wait_entered()
    victims = [asyncio.create_task(batcher.submit(images(d))) for d in (1, POISON, 3)]
    await settle()
    model.gate.set()
    await blocker
    errors = await asyncio.gather(*victims, return_exceptions=True)
    assert all(isinstance(e, ModelFailed) for e in errors), errors
    assert "batch of 3 images" in str(errors[0])
    assert model.calls == [1, 3]
    assert digits(await batcher.submit(images(4))) == [4]  # still serving
    await batcher.stop()


async def test_full_queue_rejects_at_once_with_resource_exhausted() -> None:
    model = GatedModel()
    batcher = await started(model, max_batch_size=4, max_queue_images=5)
    blocker = asyncio.create_task(batcher.submit(images(0)))
    await model.wait_entered()
    queued = [asyncio.create_task(batcher.submit(images(1, 2))) for _ in range(2)]
    await settle()
    assert batcher.queued_images == 4
    with pytest.raises(ResourceExhausted, match="limit 5"):
        await batcher.submit(images(3, 4))
    ok = asyncio.create_task(batcher.submit(images(5)))  # exactly fills the queue: accepted
    await settle()
    model.gate.set()
    await blocker
    for t in queued:
        assert digits(await t) == [1, 2]
    assert digits(await ok) == [5]
    await batcher.stop()


async def test_expired_request_is_dropped_before_compute() -> None:
    model = GatedModel()
    batcher = await started(model, max_batch_size=8)
    blocker = asyncio.create_task(batcher.submit(images(0)))
    await model.wait_entered()
    now = time.monotonic()
    expiring = asyncio.create_task(batcher.submit(images(1, 1, 1), deadline=now + 0.05))
    alive = asyncio.create_task(batcher.submit(images(2), deadline=now + 30))
    await asyncio.sleep(0.1)
    model.gate.set()
    await blocker
    with pytest.raises(DeadlineExceeded):
        await expiring
    assert digits(await alive) == [2]
    assert model.calls == [1, 1]  # the three expired images never reached the model
    await batcher.stop()


async def test_cancelled_request_leaves_the_queue_at_once() -> None:
    model = GatedModel()
    batcher = await started(model, max_batch_size=8)
    blocker = asyncio.create_task(batcher.submit(images(0)))
    await model.wait_entered()
    doomed = asyncio.create_task(batcher.submit(images(1, 1)))
    kept = asyncio.create_task(batcher.submit(images(2)))
    await settle()
    assert batcher.queued_images == 3
    doomed.cancel()
    await settle()
    assert batcher.queued_images == 1
    model.gate.set()
    await blocker
    assert digits(await kept) == [2]
    assert model.calls == [1, 1]
    await batcher.stop()


async def test_stop_refuses_new_work_and_finishes_accepted_work() -> None:
    model = GatedModel()
    batcher = await started(model, max_batch_size=2)
    blocker = asyncio.create_task(batcher.submit(images(0)))
    await model.wait_entered()
    accepted = [asyncio.create_task(batcher.submit(images(d))) for d in (1, 2, 3)]
    await settle()
    stopping = asyncio.create_task(batcher.stop())
    await settle()
    with pytest.raises(Unavailable, match="shutting down"):
        await batcher.submit(images(9))
    model.gate.set()
    await blocker
    assert [digits(await t) for t in accepted] == [[1], [2], [3]]
    await stopping
    assert model.calls == [1, 2, 1]


async def test_batch_timeout_waits_for_company_but_not_past_a_full_batch() -> None:
    model = GatedModel(gated=False)
    batcher = await started(model, max_batch_size=3, batch_timeout_s=5.0)
    first = asyncio.create_task(batcher.submit(images(1)))
    await asyncio.sleep(0.05)
    assert model.calls == []  # waiting to fill
    more = [asyncio.create_task(batcher.submit(images(d))) for d in (2, 3)]
    results = await asyncio.wait_for(asyncio.gather(first, *more), 2.0)  # full: no 5 s wait
    assert [digits(r) for r in results] == [[1], [2], [3]]
    assert model.calls == [3]
    await batcher.stop()


async def test_batch_timeout_expires_with_a_partial_batch() -> None:
    model = GatedModel(gated=False)
    batcher = await started(model, max_batch_size=8, batch_timeout_s=0.05)
    result = await asyncio.wait_for(batcher.submit(images(4)), 2.0)
    assert digits(result) == [4]
    assert model.calls == [1]
    await batcher.stop()


async def test_metrics_record_batch_sizes_and_queue_depth() -> None:
    model = GatedModel()
    metrics = ServerMetrics()
    batcher = DynamicBatcher(model, max_batch_size=8, max_queue_images=64, metrics=metrics)
    batcher.start()
    blocker = asyncio.create_task(batcher.submit(images(0)))
    await model.wait_entered()
    tasks = [asyncio.create_task(batcher.submit(images(1, 2))) for _ in range(3)]
    await settle()
    assert metrics.registry.get_sample_value("mnist_queue_images") == 6
    model.gate.set()
    await asyncio.gather(blocker, *tasks)
    reg = metrics.registry
    assert reg.get_sample_value("mnist_batch_size_images_count") == 2
    assert reg.get_sample_value("mnist_batch_size_images_sum") == 7
    assert reg.get_sample_value("mnist_queue_images") == 0
    await batcher.stop()


async def test_a_filling_thread_is_poked_when_the_call_on_its_way_ends_elsewhere() -> None:
    model = GatedModel(gated=False)
    on_the_way = [1]  # one more call was taken in; it will never reach the batcher
    batcher = DynamicBatcher(
        model, max_batch_size=8, max_queue_images=64, batch_timeout_s=30.0,
        metrics=ServerMetrics(), arriving=lambda: on_the_way[0],
    )  # fmt: skip
    batcher.start()
    first = asyncio.create_task(batcher.submit(images(5)))
    await asyncio.sleep(0.05)
    assert model.calls == []  # waiting for the call on its way
    on_the_way[0] = 0  # it failed (say, a bad body) without reaching the batcher
    batcher.poke()
    assert digits(await asyncio.wait_for(first, 5.0)) == [5]  # not the 30 s fill timeout
    await batcher.stop()


async def test_a_failing_thread_fails_the_batch_in_hand_too() -> None:
    model = GatedModel(gated=False)
    metrics = ServerMetrics()

    class BrokenHistogram:
        def observe(self, value: float) -> None:
            raise RuntimeError("a bug after the model call")

    metrics.batch_size = BrokenHistogram()  # type: ignore[assignment]
    failures: list[BaseException] = []
    batcher = DynamicBatcher(
        model, max_batch_size=4, max_queue_images=64, metrics=metrics,
        on_failure=failures.append,
    )  # fmt: skip
    batcher.start()
    with pytest.raises(Unavailable):  # computed, but never handed back: not left hanging
        await asyncio.wait_for(batcher.submit(images(1)), 5.0)
    await until(lambda: failures, timeout=5)  # posted right after the failed answers
    assert model.calls == [1] and len(failures) == 1 and not batcher.alive
    with pytest.raises(Unavailable):
        await batcher.submit(images(2))
