// The adapter block's kernels for bf16 activations: one translation unit per dtype, so that nvcc
// compiles the three in parallel.
#include "adapter_block_kernels.cuh"

AMPFUSE_INSTANTIATE_LAUNCHERS(__nv_bfloat16)
