// The adapter block's kernels for fp16 activations: one translation unit per dtype, so that nvcc
// compiles the three in parallel.
#include "adapter_block_kernels.cuh"

AMPFUSE_INSTANTIATE_LAUNCHERS(__half)
