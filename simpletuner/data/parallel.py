"""Thread pools for the I/O-bound parts of the data path, with results in input order.

Reading image headers and caption files from a bucket, fetching image bytes and decoding/resizing
pixels spend their time waiting on the network or inside C code that releases the GIL (PIL's
decoders and resamplers), so a few threads overlap them. Results always come back in input order
and only ``ahead`` items are in flight, so memory stays bounded and everything downstream (cache
keys, batch order) is identical to the sequential run.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(function: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """``map(function, items)`` run on ``workers`` threads with at most ``ahead`` items in flight.

    With ``workers <= 1`` this is the plain sequential ``map`` (no thread is started). An exception
    raised by ``function`` is re-raised when its item is reached; later items are cancelled.
    """
    if workers <= 1:
        yield from map(function, items)
        return
    ahead = max(ahead, workers)
    pending: deque[Future] = deque()
    source = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simpletuner-data") as pool:
        try:
            for item in source:
                pending.append(pool.submit(function, item))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
