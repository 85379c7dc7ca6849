"""Reusable host buffers and host ⇄ device transfers for the streaming stages.

On CUDA, host buffers are pinned and copies run asynchronously on a dedicated stream; an
event tells the writer when a result has landed on the host. Nothing here touches CUDA
unless a CUDA device was asked for, so CPU-only machines never initialise it.
"""

import os
import threading
from collections.abc import Sequence

import torch


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class BufferPool:
    """Host byte buffers of one capacity, handed out and taken back, so steady-state streaming
    allocates nothing (fresh pages cost a fault each; pinned ones a driver call)."""

    def __init__(self, capacity: int, *, pin: bool = False):
        self.capacity = max(1, capacity)
        self.pin = pin
        self.allocated = 0
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def get(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
            self.allocated += 1
        return torch.empty(self.capacity, dtype=torch.uint8, pin_memory=self.pin)

    def put(self, buffers: Sequence[torch.Tensor]) -> None:
        with self._lock:
            self._free.extend(buffers)


def view_as(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The first bytes of a byte buffer seen as a tensor of `dtype` and `shape`."""
    n = 1
    for dim in shape:
        n *= dim
    return buffer[: n * dtype.itemsize].view(dtype).view(shape)


class Transfer:
    """Moves blocks between the host buffers and the compute device.

    CPU: identity. CUDA: pinned buffers, non-blocking copies on a side stream; `ready(event)`
    blocks until a device → host copy has landed.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def __enter__(self) -> "Transfer":
        """CUDA: make the device and the side stream current. CPU: leave cores to the I/O threads.

        torch's intra-op workers meet at a barrier after every op; when the reader or writer
        thread takes a worker's core, every op waits a scheduler slice (measured on 2 cores:
        compute 10× slower and erratic). So the CPU path computes on all cores but two.
        """
        if self.cuda:
            self._contexts = [torch.cuda.device(self.device), torch.cuda.stream(self.stream)]
            for context in self._contexts:
                context.__enter__()
        else:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(max(1, min(self._threads, _usable_cores() - 2)))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            for context in reversed(self._contexts):
                context.__exit__(*exc)
        else:
            torch.set_num_threads(self._threads)

    def to_device(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of host tensors on the device, and a wait until the host buffers may be reused."""
        if not self.cuda:
            return list(tensors)
        moved = [t.to(self.device, non_blocking=True) for t in tensors]
        self.stream.synchronize()
        return moved

    def to_host(self, tensor: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """`tensor` copied into the host byte buffer `buffer` (asynchronously on CUDA)."""
        host = view_as(buffer, tensor.dtype, tuple(tensor.shape))
        host.copy_(tensor, non_blocking=self.cuda)
        return host

    def done_event(self) -> "torch.cuda.Event | None":
        """An event recorded after the copies queued so far (None on CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    @staticmethod
    def ready(event: "torch.cuda.Event | None") -> None:
        if event is not None:
            event.synchronize()

    def peak_memory(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
