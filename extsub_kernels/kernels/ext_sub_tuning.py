"""Launch settings of the Ext-Sub Triton kernel, each with the reason it has its value."""

# Largest row tile the one-pass variant holds in registers (16 K fit one program at 16 warps); longer: two loops.
MAX_BLOCK_ELEMENTS = 16384
# Short rows are packed so each program moves about this many elements: memory busy, the grid not starved.
TARGET_TILE_ELEMENTS = 4096
# Column tile of the two-loop variant (norms, then update): its second pass re-reads the row from L2, not DRAM.
LOOP_BLOCK_ELEMENTS = 4096
# One warp per 512 elements of a tile, at most this many (the hardware limit per program is 32).
MAX_WARPS = 16
