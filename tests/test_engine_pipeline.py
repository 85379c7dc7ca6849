"""engine.pipeline: read ∥ compute ∥ write with fake stages — order under random delays, an error in each stage,
Ctrl-C in compute, a stage blocked on a buffer pool woken by a stop, the bound on what is in flight; and
engine.outputs.OutputSet.stream over it: a failing stage leaves nothing behind."""

import random
import threading
import time

import pytest
import torch

from extsub_kernels.engine.outputs import OutputSet, Piece
from extsub_kernels.engine.pipeline import in_flight, run_pipeline
from extsub_kernels.engine.transfer import BufferPool, PoolClosed
from extsub_kernels.io.writer import TensorEntry

from helpers import SEED

STAGES = ("read", "compute", "write")


class Boom(Exception):
    """The error a fake stage raises."""


def _stage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("extsub-read", "extsub-write")]


def _jitter(rng: random.Random, lock: threading.Lock) -> None:
    with lock:  # random.Random is not thread-safe
        delay = rng.random() * 0.002
    time.sleep(delay)


def test_items_are_written_in_order_under_random_stage_delays():
    rng, lock = random.Random(SEED), threading.Lock()
    written, threads_seen = [], set()

    def read(i):
        _jitter(rng, lock)
        threads_seen.add(("read", threading.current_thread().name))
        return i * 10

    def compute(i, payload):
        _jitter(rng, lock)
        threads_seen.add(("compute", threading.current_thread().name))
        return payload + 1

    def write(i, result):
        _jitter(rng, lock)
        threads_seen.add(("write", threading.current_thread().name))
        written.append((i, result))

    run_pipeline(range(200), read, compute, write, depth=2)
    assert written == [(i, i * 10 + 1) for i in range(200)]
    main = threading.current_thread().name
    assert threads_seen == {("read", "extsub-read"), ("compute", main), ("write", "extsub-write")}
    assert not _stage_threads()


@pytest.mark.parametrize("failing", STAGES)
def test_an_error_in_any_stage_stops_all_three_and_reaches_the_caller(failing):
    """The stage's own exception object, raised once both threads have ended; nothing after it is written."""
    error = Boom(f"{failing} failed on item 5")
    written = []

    def stage(name, then=lambda i: i):
        def run(i, *rest):
            if name == failing and i == 5:
                raise error
            return then(i)

        return run

    with pytest.raises(Boom) as info:
        run_pipeline(range(100), stage("read"), stage("compute"), stage("write", written.append))
    assert info.value is error
    assert not _stage_threads()
    assert written == list(range(len(written))) and len(written) <= 5


def test_an_error_in_the_items_iterator_reaches_the_caller():
    def items():
        yield from range(3)
        raise Boom("the plan could not be read")

    with pytest.raises(Boom, match="the plan could not be read"):
        run_pipeline(items(), lambda i: i, lambda i, p: p, lambda i, r: None)
    assert not _stage_threads()


def test_ctrl_c_in_compute_stops_the_reader_and_the_writer():
    read, written = [], []

    def compute(i, payload):
        if i == 3:
            raise KeyboardInterrupt
        return payload

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(range(1000), lambda i: read.append(i) or i, compute, lambda i, r: written.append(i))
    assert not _stage_threads()
    assert written == [0, 1, 2][: len(written)]
    assert len(read) <= 3 + 1 + in_flight()  # the reader stopped, it did not read on to the end


@pytest.mark.parametrize("failing", ["compute", "write"])
def test_a_reader_waiting_on_a_full_pool_is_woken_by_the_stop(failing):
    """The reader holds the only buffer and waits for a second; the failing stage's stop closes the pool (on_stop), the
    reader's wait ends with PoolClosed, and the caller sees the stage's error, not the reader's PoolClosed."""
    pool = BufferPool(capacity=8, count=1)
    error = Boom(f"{failing} failed")
    reader_woken = threading.Event()

    def read(i):
        try:
            return pool.get()  # never given back: the second get waits until the pool closes
        except PoolClosed:
            reader_woken.set()
            raise

    def compute(i, buffer):
        if failing == "compute":
            time.sleep(0.05)  # the reader is waiting by now
            raise error
        return buffer

    def write(i, buffer):
        time.sleep(0.05)
        raise error

    start = time.monotonic()
    with pytest.raises(Boom) as info:
        run_pipeline(range(10), read, compute, write, on_stop=pool.close)
    assert info.value is error
    assert reader_woken.is_set() and not _stage_threads()
    assert time.monotonic() - start < 5


def test_without_on_stop_a_blocked_stage_would_never_end():
    """What on_stop is for: the same pool, closed by nothing, keeps the reader waiting after the error (checked with a
    timeout, then released by hand)."""
    pool = BufferPool(capacity=8, count=1)
    done = threading.Event()
    outcome = []

    def run():
        try:
            run_pipeline(range(10), lambda i: pool.get(), lambda i, b: (_ for _ in ()).throw(Boom()), lambda i, r: None)
        except BaseException as e:
            outcome.append(e)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert not done.wait(0.5)  # stuck: the reader waits on the pool, the caller on the reader
    pool.close()
    assert done.wait(5) and isinstance(outcome[0], Boom)


def test_the_reader_runs_at_most_in_flight_items_ahead_of_the_writer():
    read, written, ahead = [], [], []
    lock = threading.Lock()

    def reader(i):
        with lock:
            read.append(i)
            ahead.append(len(read) - len(written))
        return i

    def writer(i, r):
        time.sleep(0.002)  # the slow stage: the others wait on it
        with lock:
            written.append(i)

    run_pipeline(range(60), reader, lambda i, p: p, writer, depth=1)
    assert written == list(range(60))
    assert max(ahead) <= 2 * in_flight()  # the items that hold inputs plus those that hold results


def test_a_failed_write_stage_in_an_output_set_publishes_nothing(tmp_path):
    """OutputSet.stream over the pipeline: the writer's error reaches the caller, and leaving the set removes every
    temporary file; the target never appears."""
    entries = [TensorEntry(f"t{i}", torch.float32, (4,)) for i in range(4)]
    target = tmp_path / "out.safetensors"

    def compute(entry, payload):
        if entry.name == "t2":
            return Piece(entry.name, (torch.ones(5),), 20)  # the wrong shape: the writer refuses it
        return Piece(entry.name, (torch.full((4,), float(payload)),), 16)

    with pytest.raises(Exception, match="t2"), OutputSet([target], entries, [{}]) as outputs:
        outputs.stream(entries, lambda e: int(e.name[1:]), compute, total=64, progress=False)
        outputs.commit()
    assert not _stage_threads()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_output_set_streams_every_piece_to_every_output(tmp_path):
    from safetensors.torch import load_file

    entries = [TensorEntry(f"t{i}", torch.float32, (3,)) for i in range(5)]
    targets = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]

    def compute(entry, i):
        return Piece(entry.name, (torch.full((3,), float(i)), torch.full((3,), -float(i))), 12)

    with OutputSet(targets, entries, [{}, {}]) as outputs:
        outputs.stream(entries, lambda e: int(e.name[1:]), compute, total=60, progress=False)
        assert outputs.commit() == tuple(targets)
    a, b = (load_file(t) for t in targets)
    assert all(torch.equal(a[f"t{i}"], torch.full((3,), float(i))) for i in range(5))
    assert all(torch.equal(b[f"t{i}"], torch.full((3,), -float(i))) for i in range(5))
