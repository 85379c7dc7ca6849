"""Private Triton kernels; import lazily (importing triton is not free, and may be absent)."""
