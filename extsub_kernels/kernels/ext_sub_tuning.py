"""Launch settings of the Ext-Sub Triton kernel, each with the reason it has its value."""

# Largest row tile held in registers by the one-pass variant (bf16/fp32: 16 K elements fit the
# register file of one program at 16 warps); longer rows take the two-loop variant.
MAX_BLOCK_ELEMENTS = 16384
# Short rows are packed several to a program so each program moves about this many elements,
# enough to keep the memory system busy without starving the grid of programs.
TARGET_TILE_ELEMENTS = 4096
# Column tile of the two-loop variant (norms, then update): small enough that the second pass
# re-reads the row from L2 rather than DRAM.
LOOP_BLOCK_ELEMENTS = 4096
# One warp per 512 elements of a tile, at most this many (the hardware limit per program is 32).
MAX_WARPS = 16
