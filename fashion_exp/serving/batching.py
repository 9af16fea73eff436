"""Requests that arrive while a model is busy, answered by one model call together: where the
service's throughput under concurrency comes from."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fashion_exp.core.data import CLASSES

Predict = Callable[[np.ndarray], np.ndarray]  # (n, 28, 28) uint8 -> (n, 10) probabilities
Waiting = tuple[np.ndarray, asyncio.Future[np.ndarray]]  # a request's images, its answer


class ModelFailed(RuntimeError):
    """A model that failed on valid input, or answered it with something other than class
    probabilities: the service's fault (500), never sent on as numbers."""


def output_problem(probs: Any, count: int, what: str = "images") -> str | None:
    """What is wrong with a model's answer to `count` images; None when it is `count` rows of
    10 finite class probabilities (each in [0, 1], each row summing to 1)."""
    shape = np.shape(probs)
    if shape != (count, len(CLASSES)):
        return (f"its answer to {count} {what} has shape {shape}, not ({count}, "
                f"{len(CLASSES)}) class probabilities")
    probs = np.asarray(probs, np.float64)
    if not np.isfinite(probs).all():
        return f"its answer to {count} {what} is not finite (NaN or infinity)"
    if probs.min() < 0 or probs.max() > 1 or np.abs(probs.sum(axis=1) - 1).max() > 1e-3:
        return (f"its answer to {count} {what} is not probabilities (values in [0, 1] that "
                "sum to 1 per image: a model without softmax?)")
    return None


class Batcher:
    """Collects the images of requests waiting for one model and runs them in one call."""

    def __init__(self, predict: Predict, executor: ThreadPoolExecutor, max_batch: int,
                 observe: Callable[[int], None] | None = None) -> None:
        self.predict, self.executor, self.max_batch = predict, executor, max_batch
        self.observe = observe  # told the size of every model call
        self.queue: asyncio.Queue[Waiting | None] | None = None
        self.worker: asyncio.Task | None = None
        self.closed = False

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for (n, 28, 28) uint8 images, computed together with other requests'."""
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.done():
            # Started inside the server's event loop; started again for a request that took
            # this model just before it was closed (a swapped or dropped model), so that
            # request is still answered, by the model it took.
            self.queue = asyncio.Queue()
            self.worker = loop.create_task(self._work())
        done = loop.create_future()
        self.queue.put_nowait((images, done))
        return await done

    def close(self) -> None:
        """Stop the worker once the requests already queued are answered."""
        self.closed = True
        if self.queue is not None:
            self.queue.put_nowait(None)  # wakes an idle worker

    async def _work(self) -> None:
        """Answer the queued requests, as many together as max_batch allows, until closed."""
        assert self.queue is not None
        while True:
            if (first := await self.queue.get()) is None:
                if self.closed and self.queue.empty():
                    return
                continue
            await self._run(self._gather(first))
            if self.closed and self.queue.empty():
                return

    def _gather(self, first: Waiting) -> list[Waiting]:
        """`first` and the requests queued behind it, while the batch is under max_batch."""
        assert self.queue is not None
        waiting, count = [first], len(first[0])
        while not self.queue.empty() and count < self.max_batch:
            if (item := self.queue.get_nowait()) is not None:
                waiting.append(item)
                count += len(item[0])
        return waiting

    async def _run(self, waiting: list[Waiting]) -> None:
        """One model call for the waiting requests; each gets its rows, or the failure."""
        loop = asyncio.get_running_loop()
        try:
            batch = np.concatenate([images for images, _ in waiting])
            if self.observe:
                self.observe(len(batch))
            probs = await loop.run_in_executor(self.executor, self.predict, batch)
            if np.shape(probs) != (len(batch), len(CLASSES)):
                raise ModelFailed(output_problem(probs, len(batch)))
        except Exception as err:  # answered to each waiting request, the loop goes on
            for _, done in waiting:
                if not done.done():
                    done.set_exception(err)
        else:
            answer_each(waiting, probs)


def answer_each(waiting: list[Waiting], probs: np.ndarray) -> None:
    """Each waiting request's rows of `probs`, in the order they were batched."""
    start = 0
    for images, done in waiting:
        if not done.done():  # a client that went away cancels its future
            answer = probs[start:start + len(images)]
            # A model checked when it was loaded may still overflow on some input: only that
            # request fails, and no NaN reaches an answer.
            if np.isfinite(answer).all():
                done.set_result(answer)
            else:
                done.set_exception(ModelFailed(output_problem(answer, len(images))))
        start += len(images)
