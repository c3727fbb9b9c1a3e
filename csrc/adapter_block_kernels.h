#pragma once
// The CUDA adapter block's kernels as the host code (csrc/adapter_block.cpp) sees them: the argument
// structs, the shared-memory sizes and one launcher per direction and dtype. No ATen here. The kernels
// are in adapter_block_kernels.cuh, instantiated once per dtype in adapter_block_{fp32,fp16,bf16}.cu:
// three translation units that nvcc compiles in parallel (each backward is minutes of straight-line code).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

// The activation and scale-mode codes are kernels/codes.py's, passed by setup.py as -D macros
// (AMPFUSE_ACT_*, AMPFUSE_SCALE_*), so the CUDA, Triton and Python sides switch on one table.
#if !defined(AMPFUSE_ACT_IDENTITY) || !defined(AMPFUSE_ACT_RELU) || !defined(AMPFUSE_ACT_GELU) || \
    !defined(AMPFUSE_ACT_GELU_TANH) || !defined(AMPFUSE_ACT_SILU) || !defined(AMPFUSE_ACT_TANH) ||    \
    !defined(AMPFUSE_SCALE_FLOAT) || !defined(AMPFUSE_SCALE_SCALAR) || !defined(AMPFUSE_SCALE_CHANNEL)
#error "build through setup.py: it passes the codes of kernels/codes.py as -D macros (AMPFUSE_ACT_*, AMPFUSE_SCALE_*)"
#endif

namespace ampfuse::adapter_cuda {

constexpr int kWarp = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarp;

struct Params {
  const float *gamma, *beta, *ga, *ba, *bd, *bu, *scale;
  const int64_t* seed;
  float scale_value, eps, eps_a, p_drop;
  int64_t M;
  int D, K, act, scale_mode;  // codes.py's: AMPFUSE_ACT_*, AMPFUSE_SCALE_* (float, learned scalar, per channel)
  bool orig_ln_before, ln_before, residual_before_ln, dropout;
};

struct TileShape {
  int BM, DP, KP;
};

__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

template <typename T>
__host__ __device__ inline size_t fwd_shared_bytes(TileShape t) {
  return align128(sizeof(float) * t.BM * t.DP) + align128(sizeof(T) * t.BM * t.DP) +
         align128(sizeof(float) * t.BM * t.KP) + align128(sizeof(T) * t.BM * t.KP) +
         align128(sizeof(float) * kWarps * 256);
}

struct Offsets {  // into a program's slice of the partial buffer; -1 when not computed
  int64_t w_up, w_down, b_up, b_down, scale, gamma, beta, ga, ba;
};

constexpr int kBM = 16;

template <typename T>
__host__ __device__ constexpr size_t bwd_shared_bytes(int DP, int KP) {
  return 2 * align128(sizeof(float) * kBM * DP) + align128(sizeof(T) * kBM * DP) +
         align128(sizeof(float) * kBM * KP) + 2 * align128(sizeof(T) * kBM * KP) +
         align128(sizeof(float) * kWarps * 256) + align128(sizeof(float) * kWarps * kBM) +
         align128(sizeof(float) * 4 * kBM);
}

// The most columns per thread (CPT) a backward can need: its shared memory grows with DP, and no
// GPU gives a block more than 227 KiB (Hopper, Blackwell), so the widest DP that can launch is the
// widest that fits there at the smallest KP: 1376 (fp16/bf16) and 1136 (fp32), i.e. CPT 6 and 5.
// The widest kernel is compiled for that CPT instead of 8 (2048 columns, never usable past 1376):
// it was the costliest instantiation to compile (README, "The CUDA extension").
constexpr size_t kMaxSharedPerBlock = 227 * 1024;

template <typename T>
constexpr int top_cpt() {
  int dp = 16;
  while (bwd_shared_bytes<T>(dp + 16, 16) <= kMaxSharedPerBlock) dp += 16;
  return (dp + kThreads - 1) / kThreads;
}
static_assert(top_cpt<float>() == 5 && top_cpt<__half>() == 6 && top_cpt<__nv_bfloat16>() == 6,
              "the shared-memory bound changed: check the backward's dispatch");

struct Slice {  // where a block's partial gradients live in its slice (floats)
  int64_t width, wu, wd;
};

// What the host side settles before a launch: the stream and the device's limits.
struct Device {
  cudaStream_t stream;
  int sms;
  int max_shared;  // bytes of shared memory a block may opt in to
};

// A persistent grid: `per_sm` blocks per multiprocessor, never more than there are work items (rows
// or row tiles). The backward keeps it at 2, since each block owns a full partial-gradient slice.
inline int grid_size(int64_t items, int per_sm, int sms) {
  return static_cast<int>(std::min<int64_t>(items, static_cast<int64_t>(std::max(per_sm, 1)) * sms));
}

// T: float, __half or __nv_bfloat16. The weights come padded to (KP, DP) and (DP, KP), in T.
template <typename T>
struct FwdArgs {
  Params p;
  TileShape tile;
  const T *h, *r, *w_down, *w_up;
  T* y;
};

template <typename T>
struct BwdArgs {
  Params p;
  int DP, KP;
  Offsets off;
  Slice sl;
  bool ln_grad, input_grad;
  const T *dy, *h, *r, *w_down, *w_up;
  T *dh, *dr;  // null without input_grad
};

// The forward over a tile of `a.tile.BM` rows per block, with `shared` bytes of shared memory.
template <typename T>
cudaError_t launch_fwd(const FwdArgs<T>& a, size_t shared, Device device);

// How many blocks the backward runs (the rows of its partial buffer).
template <typename T>
cudaError_t bwd_programs(const BwdArgs<T>& a, size_t shared, Device device, int* programs);

// The backward into `part` (programs x a.sl.width floats), then their sum into flat (total floats).
template <typename T>
cudaError_t launch_bwd(const BwdArgs<T>& a, size_t shared, Device device, int programs, float* part, float* flat,
                       int64_t total);

// Each dtype's launchers are instantiated in its own translation unit, adapter_block_<dtype>.cu (PREFIX
// empty), and nowhere else (PREFIX extern).
#define AMPFUSE_LAUNCHERS(PREFIX, T)                                                                       \
  PREFIX template cudaError_t launch_fwd<T>(const FwdArgs<T>&, size_t, Device);                            \
  PREFIX template cudaError_t bwd_programs<T>(const BwdArgs<T>&, size_t, Device, int*);                    \
  PREFIX template cudaError_t launch_bwd<T>(const BwdArgs<T>&, size_t, Device, int, float*, float*, int64_t);
AMPFUSE_LAUNCHERS(extern, float)
AMPFUSE_LAUNCHERS(extern, __half)
AMPFUSE_LAUNCHERS(extern, __nv_bfloat16)

}  // namespace ampfuse::adapter_cuda
