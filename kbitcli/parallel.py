"""Tensor-level parallelism for streaming commands (encode): a few tensors at once, one thread each.

Quantizing a chunk is ~25 short torch ops. With torch's own intra-op threads every op is a parallel region
that ends in a barrier, and as soon as the cores are shared (another process, or our own sha256 thread) each
barrier waits for a descheduled thread: measured on 2 busy cores, encode ran up to 8x slower with 2 torch
threads than with 1. Whole tensors on separate Python threads do not wait for each other (torch releases the
GIL inside ops), so we run torch single-threaded and give each worker its own tensor. Peak memory is then
`workers` tensors in flight: bounded, and still independent of the model's size.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

MAX_WORKERS = 4  # each holds one tensor (and its codes) in memory
T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


@contextlib.contextmanager
def single_threaded_torch():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in input order, computing up to `workers` items ahead on a thread pool.
    An exception from fn is raised here, for its item, after the items before it came out."""
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kbit-worker")
    pending: deque = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error: drop what has not started yet
