"""Triton kernels. Each kernel module (`expand`, `dequant`, `gguf_dequant`) holds its @triton.jit
kernels, their launch wrappers and the torch reference they must match bit for bit; `bitmap` holds
the jit helpers the bitmap kernels share, `launch` the wrappers' checks, `decompress` the one entry
point callers use, `aot` the compilation for CUDA targets without a GPU."""
