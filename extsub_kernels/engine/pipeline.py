"""Three overlapping stages: read item i+1 (a thread), compute item i (the caller), write item i-1 (a thread), with
`depth`-item queues between; any error stops all three and is raised once both threads have ended."""

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

_DONE = object()
_STOPPED = object()
_POLL_S = 0.05


def in_flight(depth: int = 1) -> int:
    """Items that can hold buffers of one side (inputs, or results) at once: one per stage and `depth` per queue."""
    return depth + 2


def run_pipeline(
    items: Iterable[Any],
    read: Callable[[Any], Any],
    compute: Callable[[Any, Any], Any],
    write: Callable[[Any, Any], None],
    *,
    depth: int = 1,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """write(item, compute(item, read(item))) for each item in order, read and write in threads; `on_stop` runs
    when a stage fails and at the end, before joining, to wake a stage blocked elsewhere. Raises the first error."""
    stop = threading.Event()
    errors: list[BaseException] = []
    to_compute: queue.Queue = queue.Queue(maxsize=depth)
    to_write: queue.Queue = queue.Queue(maxsize=depth)

    def put(q: queue.Queue, value: Any) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                q.put(value, timeout=_POLL_S)
                return True
        return False

    def get(q: queue.Queue) -> Any:
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if stop.is_set():
                    return _STOPPED

    def halt() -> None:
        stop.set()
        if on_stop is not None:
            on_stop()

    def fail(error: BaseException) -> None:
        errors.append(error)
        halt()

    def reader() -> None:
        try:
            for item in items:
                if stop.is_set() or not put(to_compute, (item, read(item))):
                    return
            put(to_compute, _DONE)
        except BaseException as e:
            fail(e)

    def writer() -> None:
        try:
            while (got := get(to_write)) not in (_DONE, _STOPPED):
                write(*got)
        except BaseException as e:
            fail(e)

    stages = ((reader, "extsub-read"), (writer, "extsub-write"))
    threads = [threading.Thread(target=stage, name=name, daemon=True) for stage, name in stages]
    for t in threads:
        t.start()
    try:
        while (got := get(to_compute)) not in (_DONE, _STOPPED):
            item, payload = got
            if not put(to_write, (item, compute(item, payload))):
                break
        else:
            if got is _DONE:
                put(to_write, _DONE)
        while threads[1].is_alive() and not stop.is_set():
            threads[1].join(_POLL_S)
    except BaseException:
        earlier = list(errors)  # a thread failed first: this error is what its stop did to the compute stage
        halt()
        for t in threads:
            t.join()
        if earlier:
            raise earlier[0] from None
        raise
    halt()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
