"""Cutting tensors into blocks: whole rows, rows longer than a block in pieces, and the two passes Ext-Sub needs."""

import torch

from extsub_kernels.engine.plan import Block, TensorJob, cut_blocks, row_elements


def _job(shape, *, merged=True, transposed=False) -> TensorJob:
    return TensorJob("w", shape, torch.float32, antis=(1,) if merged else (), transposed=transposed)


def _summary(blocks: list[Block]) -> list[tuple]:
    return [(b.start, b.stop, b.cols, b.phase) for b in blocks]


def test_rows_that_fit_go_in_blocks_of_whole_rows_computed_in_one_pass():
    blocks = cut_blocks(_job((5, 4)), row_bytes=16, block_bytes=40, whole_rows=True)
    assert _summary(blocks) == [(0, 2, None, "one-pass"), (2, 4, None, "one-pass"), (4, 5, None, "one-pass")]
    assert [b.shape() for b in blocks] == [(2, 4), (2, 4), (1, 4)]
    assert [b.elements() for b in blocks] == [(0, 8), (8, 8), (16, 4)]


def test_a_row_longer_than_a_block_streams_its_pieces_twice_norms_then_update_row_by_row():
    blocks = cut_blocks(_job((2, 10)), row_bytes=40, block_bytes=16, whole_rows=True)
    pieces = [(0, 4), (4, 8), (8, 10)]
    expected = [(r, r + 1, c, phase) for r in range(2) for phase in ("norms", "update") for c in pieces]
    assert _summary(blocks) == expected
    assert blocks[-1].shape() == (2,) and blocks[-1].elements() == (18, 2)


def test_a_1d_tensor_is_one_row():
    assert row_elements((7,)) == 7 and row_elements(()) == 1 and row_elements((0, 3)) == 0
    assert _summary(cut_blocks(_job((7,)), row_bytes=28, block_bytes=64, whole_rows=True)) == [(0, 1, None, "one-pass")]
    assert len(cut_blocks(_job((7,)), row_bytes=28, block_bytes=8, whole_rows=True)) == 2 * 4


def test_elementwise_methods_and_copies_need_no_norms_so_long_rows_stream_once():
    for job, whole_rows in ((_job((1, 10)), False), (_job((1, 10), merged=False), True)):
        blocks = cut_blocks(job, row_bytes=40, block_bytes=16, whole_rows=whole_rows)
        assert _summary(blocks) == [(0, 1, (0, 4), "one-pass"), (0, 1, (4, 8), "one-pass"), (0, 1, (8, 10), "one-pass")]


def test_a_conv1d_weight_pairs_columns_so_its_norms_span_every_block_of_rows():
    job = _job((5, 4), transposed=True)
    assert _summary(cut_blocks(job, row_bytes=16, block_bytes=400, whole_rows=True)) == [(0, 5, None, "one-pass")]
    spans = [(0, 2), (2, 4), (4, 5)]
    expected = [(a, b, None, phase) for phase in ("norms", "update") for a, b in spans]
    assert _summary(cut_blocks(job, row_bytes=16, block_bytes=40, whole_rows=True)) == expected
    # sub and add are elementwise: the same blocks, once
    assert _summary(cut_blocks(job, row_bytes=16, block_bytes=40, whole_rows=False)) == [
        (a, b, None, "one-pass") for a, b in spans
    ]


def test_a_conv1d_weight_with_rows_longer_than_a_block_runs_all_norms_before_any_update():
    blocks = cut_blocks(_job((2, 10), transposed=True), row_bytes=40, block_bytes=16, whole_rows=True)
    phases = [b.phase for b in blocks]
    assert phases == ["norms"] * 6 + ["update"] * 6 and blocks[0].cols == (0, 4) and blocks[5].start == 1


def test_empty_tensors_have_no_blocks():
    assert cut_blocks(_job((0, 4)), row_bytes=16, block_bytes=64, whole_rows=True) == []
    assert cut_blocks(_job((4, 0)), row_bytes=0, block_bytes=64, whole_rows=True) == []
