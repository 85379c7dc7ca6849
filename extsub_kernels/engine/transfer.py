"""The streaming stages' memory and transfers: buffer pools and the workspace, sized once, and host ⇄ device copies
(on CUDA: pinned buffers, a side stream, an event per result; nothing touches CUDA unless asked)."""

import math
import os
import threading
from collections.abc import Sequence

import torch


class PoolClosed(RuntimeError):
    """Raised in a stage waiting for a buffer when the run stops (another stage failed or was interrupted)."""


class BufferPool:
    """At most `count` byte buffers of one capacity, created on demand and reused last in, first out; `get` waits
    when all are out (back-pressure: `count × capacity` bounds memory whatever the timing)."""

    def __init__(self, capacity: int, count: int, *, device: torch.device | None = None, pin: bool = False):
        if capacity < 0 or count < 1:
            raise ValueError(f"a pool needs count >= 1 and capacity >= 0, got count={count}, capacity={capacity}")
        self.capacity = max(1, capacity)
        self.count = count
        self.device = device or torch.device("cpu")
        self.pin = pin
        self.allocated = self.in_use = self.peak_in_use = 0
        self._free: list[torch.Tensor] = []
        self._closed = False
        self._changed = threading.Condition()

    def get(self) -> torch.Tensor:
        """A buffer of `capacity` bytes; waits while all `count` are in use. Raises PoolClosed after `close`."""
        with self._changed:
            while not self._free and self.allocated >= self.count and not self._closed:
                self._changed.wait()
            if self._closed:
                raise PoolClosed("the merge stopped while this stage waited for a buffer")
            self.in_use += 1
            self.peak_in_use = max(self.peak_in_use, self.in_use)
            if self._free:
                return self._free.pop()
            self.allocated += 1
        return torch.empty(self.capacity, dtype=torch.uint8, device=self.device, pin_memory=self.pin)

    def put(self, buffers: Sequence[torch.Tensor]) -> None:
        with self._changed:
            self._free.extend(buffers)
            self.in_use -= len(buffers)
            self._changed.notify_all()

    def close(self) -> None:
        """Wake every stage waiting in `get` with PoolClosed: the run is stopping."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class Workspace:
    """The compute stage's slots of `elements` numbers of up to `itemsize` bytes, each its own storage, on first use."""

    def __init__(self, elements: int, slots: int, *, itemsize: int = 4, device: torch.device | None = None):
        self.elements, self.itemsize = max(1, elements), itemsize
        self.device = device or torch.device("cpu")
        self._slots: list[torch.Tensor | None] = [None] * slots

    @property
    def nbytes(self) -> int:
        """Bytes of every slot, allocated or not."""
        return len(self._slots) * self.elements * self.itemsize

    def slot(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Slot `index` seen as a contiguous tensor of `shape` and `dtype` (at most `elements` numbers)."""
        n = math.prod(shape)
        if n > self.elements or dtype.itemsize > self.itemsize or not 0 <= index < len(self._slots):
            raise ValueError(
                f"workspace slot {index} of {len(self._slots)} holds {self.elements} numbers of {self.itemsize} "
                f"bytes; {dtype} {shape} does not fit"
            )
        if self._slots[index] is None:
            self._slots[index] = torch.empty(self.elements * self.itemsize, dtype=torch.uint8, device=self.device)
        return self._slots[index][: n * dtype.itemsize].view(dtype).view(shape)


def view_as(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The first bytes of a byte buffer seen as a tensor of `dtype` and `shape`."""
    return buffer[: math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


class Transfer:
    """Moves blocks between the host buffers and the compute device: CPU, identity; CUDA, non-blocking copies on a side
    stream (`done_event()` tells when a device → host copy has landed)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def __enter__(self) -> "Transfer":
        """CUDA: the device and side stream current. CPU: all cores but two, left to the I/O threads (torch's workers
        meet at a barrier after every op: one whose core is taken stalls all; 10× slower on 2 cores)."""
        if self.cuda:
            self._contexts = [torch.cuda.device(self.device), torch.cuda.stream(self.stream)]
            for context in self._contexts:
                context.__enter__()
        else:
            self._threads = torch.get_num_threads()
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, min(self._threads, cores - 2)))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            for context in reversed(self._contexts):
                context.__exit__(*exc)
        else:
            torch.set_num_threads(self._threads)

    def to_device_into(self, tensors: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Host tensors copied into device byte buffers (one each); returns once the host buffers may be reused."""
        if not self.cuda:
            return list(tensors)
        moved = [view_as(buffer, t.dtype, tuple(t.shape)) for t, buffer in zip(tensors, buffers, strict=True)]
        for target, t in zip(moved, tensors, strict=True):
            target.copy_(t, non_blocking=True)
        self.stream.synchronize()
        return moved

    def to_host(self, tensor: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """`tensor` copied into the host byte buffer `buffer` (asynchronously on CUDA)."""
        host = view_as(buffer, tensor.dtype, tuple(tensor.shape))
        host.copy_(tensor, non_blocking=self.cuda)
        return host

    def done_event(self) -> "torch.cuda.Event":
        """CUDA: an event on the side stream; its `synchronize()` waits for the copies queued so far."""
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def peak_memory(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
