"""The local pipeline: read ahead in one thread, run the model here, write behind in another.

Reading (decoding the sources' blocks) and writing (compressing the output)
overlap the model's compute through bounded queues, so memory depends on the
tile size and the prefetch depth, never on the raster size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["run_pipeline"]

#: What flows through the pipeline: a tile, or a group of tiles run as one batch.
Item = TypeVar("Item")
#: A read item's model inputs, and the model's result for it.
Feed = TypeVar("Feed")
Values = TypeVar("Values")


def run_pipeline(tiles: Iterable[Item],
              read: Callable[[Item], Feed],
              infer: Callable[[Item, Feed], Values],
              write: Callable[[Item, Values], None],
              close: Callable[[], None], prefetch: int) -> None:
    """Read ahead in one thread, run the model here, write behind in another thread.

    At most ``prefetch`` tiles are read ahead and ``prefetch`` written behind, so
    memory stays bounded; the first error of any stage stops the run and is raised.
    """
    prefetch = max(1, int(prefetch))
    with ThreadPoolExecutor(1, thread_name_prefix="terrapatch-read") as readers, \
            ThreadPoolExecutor(1, thread_name_prefix="terrapatch-write") as writers:
        pending_reads: deque[tuple[Item, Future[Any]]] = deque()
        pending_writes: deque[Future[Any]] = deque()
        queue = iter(tiles)

        def submit_read() -> None:
            tile = next(queue, None)
            if tile is not None:
                pending_reads.append((tile, readers.submit(read, tile)))

        try:
            for _ in range(prefetch):
                submit_read()
            while pending_reads:
                tile, future = pending_reads.popleft()
                feed = future.result()
                submit_read()
                values = infer(tile, feed)
                del feed
                pending_writes.append(writers.submit(write, tile, values))
                while len(pending_writes) > prefetch:
                    pending_writes.popleft().result()
            while pending_writes:
                pending_writes.popleft().result()
        except BaseException:
            for _, future in pending_reads:
                future.cancel()
            for future in pending_writes:
                future.cancel()
            raise
        finally:
            readers.submit(close).result()
