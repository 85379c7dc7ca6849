"""Buffer pools and the workspace: a fixed number of buffers, handed out and back, and waits instead of growth."""

import threading

import pytest
import torch

from extsub_kernels.engine.transfer import BufferPool, PoolClosed, Workspace, view_as


def test_a_pool_reuses_its_buffers_last_in_first_out_and_never_creates_more_than_its_count():
    pool = BufferPool(1024, count=3)
    first, second = pool.get(), pool.get()
    pool.put([second])
    assert pool.get() is second  # the buffer given back last comes out first: unused ones stay untouched
    pool.put([first, second])
    for _ in range(10):
        taken = [pool.get() for _ in range(3)]
        pool.put(taken)
    assert (pool.allocated, pool.in_use, pool.peak_in_use) == (3, 0, 3)
    assert all(b.numel() == 1024 and b.dtype == torch.uint8 for b in taken)


def test_get_waits_for_a_buffer_given_back_instead_of_allocating_one_more():
    pool = BufferPool(16, count=1)
    held = pool.get()
    got: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: got.append(pool.get()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got, "get() must wait while every buffer is in use"
    pool.put([held])
    waiter.join(10)
    assert got == [held] and pool.allocated == 1


def test_close_wakes_a_waiting_stage_with_pool_closed():
    pool = BufferPool(16, count=1)
    pool.get()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            pool.get()
        except PoolClosed as e:
            errors.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    pool.close()
    waiter.join(10)
    assert not waiter.is_alive() and "the merge stopped while this stage waited for a buffer" in str(errors[0])


def test_a_pool_refuses_a_count_below_one():
    with pytest.raises(ValueError, match="a pool needs count >= 1 and capacity >= 0, got count=0"):
        BufferPool(16, count=0)


def test_workspace_slots_are_separate_storages_of_any_dtype_up_to_their_size():
    ws = Workspace(100, 3, itemsize=8)
    a = ws.slot(0, (10, 10), torch.float64)
    b = ws.slot(1, (4, 25), torch.float32)
    assert a.shape == (10, 10) and b.dtype == torch.float32 and a.is_contiguous()
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()  # the op never sees them overlap
    assert ws.nbytes == 3 * 100 * 8
    with pytest.raises(ValueError, match=r"workspace slot 0 of 3 holds 100 numbers of 8 bytes; torch.float32 \(101,\)"):
        ws.slot(0, (101,), torch.float32)
    with pytest.raises(ValueError, match="holds 100 numbers of 4 bytes; torch.float64"):
        Workspace(100, 1).slot(0, (2,), torch.float64)


def test_view_as_sees_the_first_bytes_of_a_buffer_as_a_tensor():
    buffer = torch.arange(16, dtype=torch.uint8)
    t = view_as(buffer, torch.int16, (2, 3))
    assert t.shape == (2, 3) and t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
