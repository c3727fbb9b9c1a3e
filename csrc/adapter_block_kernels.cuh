#pragma once
// Adapter block (docs/design.md section 2) in CUDA C++: the kernels, and the launchers that
// adapter_block_kernels.h declares. Included once per dtype (adapter_block_{fp32,fp16,bf16}.cu).
//
// Forward: row tiles per block of 8 warps, LayerNorms a warp per row with the row in registers,
// the two bottleneck GEMMs on tensor cores (WMMA) for fp16/bf16 (see adapter_block_fwd_kernel).
// Backward: 16-row tiles per block of 8 warps, recomputing the forward; row phases column-owner
// (a thread holds some columns of all 16 rows), the four GEMMs and the two weight-gradient
// products on tensor cores, each block adding its gradients to its own fp32 slice of a partial
// buffer (no atomics: deterministic), then a reduction kernel (see adapter_block_bwd_kernel).
// Dropout uses the same Philox4x32-10 stream and counter layout as Triton's tl.rand, so masks
// match the Triton kernels bit for bit.
//
// Vector parameters arrive as fp32 and the two weight matrices padded and in the activation
// dtype (ampfuse/ops/cuda.py prepares both); hidden states are fp32/fp16/bf16.

#include <mma.h>

#include <type_traits>

#include "adapter_block_kernels.h"

namespace ampfuse::adapter_cuda {
namespace {

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Triton's tl.rand(seed, offset): Philox4x32-10 on (offset_lo, offset_hi, 0, 0) with key
// (seed_lo, seed_hi), first word, mapped to [0, 1) as uint_to_uniform_float does.
__device__ __forceinline__ float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = __umulhi(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = __umulhi(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = static_cast<int32_t>(c0);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

__device__ __forceinline__ float act(float z, int code) {
  switch (code) {
    case AMPFUSE_ACT_RELU: return fmaxf(z, 0.f);
    case AMPFUSE_ACT_GELU: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case AMPFUSE_ACT_GELU_TANH: return 0.5f * z * (1.f + tanhf(0.7978845608028654f * (z + 0.044715f * z * z * z)));
    case AMPFUSE_ACT_SILU: return z / (1.f + expf(-z));
    case AMPFUSE_ACT_TANH: return tanhf(z);
    default: return z;  // AMPFUSE_ACT_IDENTITY
  }
}

__device__ __forceinline__ float act_grad(float z, int code) {
  switch (code) {
    case AMPFUSE_ACT_RELU: return z > 0.f ? 1.f : 0.f;
    case AMPFUSE_ACT_GELU:
      return 0.5f * (1.f + erff(z * 0.70710678118654752f)) + z * 0.3989422804014327f * expf(-0.5f * z * z);
    case AMPFUSE_ACT_GELU_TANH: {
      const float t = tanhf(0.7978845608028654f * (z + 0.044715f * z * z * z));
      return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * 0.7978845608028654f * (1.f + 3.f * 0.044715f * z * z);
    }
    case AMPFUSE_ACT_SILU: { const float s = 1.f / (1.f + expf(-z)); return s * (1.f + z * (1.f - s)); }
    case AMPFUSE_ACT_TANH: { const float t = tanhf(z); return 1.f - t * t; }
    default: return 1.f;  // AMPFUSE_ACT_IDENTITY
  }
}

__device__ __forceinline__ float scale_at(const Params& p, int i) {
  return p.scale_mode == AMPFUSE_SCALE_CHANNEL ? p.scale[i]
                                               : (p.scale_mode == AMPFUSE_SCALE_SCALAR ? p.scale[0] : p.scale_value);
}

__device__ __forceinline__ float keep_factor(const Params& p, int64_t index) {
  if (!p.dropout) return 1.f;
  return philox_uniform(static_cast<uint64_t>(*p.seed), static_cast<uint64_t>(index)) >= p.p_drop
             ? 1.f / (1.f - p.p_drop) : 0.f;
}

// ---------------------------------------------------------------------------------------------
// Forward: tiles of BM rows (BM a multiple of 16) per block of 8 warps, persistent over tiles.
// Row phases (LayerNorms, residual, output) run a warp per row with the row in registers
// (VPL values per lane, so D <= 32 * VPL); the two bottleneck GEMMs run on tensor cores (WMMA,
// fp32 accumulation) for fp16/bf16 and on CUDA cores for fp32. Shared memory per block:
//   X  fp32 [BM][DP]  a_res + r, then o = X + s * keep * (v + b_up)
//   AN T    [BM][DP]  LN_a(a) (GEMM 1's A operand; padded columns are 0)
//   Z  fp32 [BM][KP]  an W_down^T
//   PK T    [BM][KP]  f(z + b_down) (GEMM 2's A operand)
//   STG fp32 [8][256] one 16x16 staging tile per warp (GEMM 2's epilogue)
// The weights come padded to DP, KP (multiples of 16) and in the activation dtype, so every
// WMMA fragment load is aligned; padded weight rows/columns are 0 and f(0) = 0 for every
// activation, so padding never changes a result.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// c (16x16 fp32, row-major, leading dimension ldc; shared or global memory) = [c +] A B, with
// A [16 x kdim] in shared memory: A(m, k) = a[m * lda + k], or a[k * lda + m] when kATransposed;
// B [kdim x 16]: B(k, n) = b[k * ldb + n] when kBRowMajor, else b[n * ldb + k] (a row-major
// weight read as its transpose). One warp per call; kdim a multiple of 16.
template <typename T, bool kATransposed, bool kBRowMajor>
__device__ __forceinline__ void warp_tile_gemm(const T* a, int lda, const T* b, int ldb, int kdim, float* c,
                                               int ldc, bool accumulate, int lane) {
  if constexpr (std::is_same_v<T, float>) {
    // CUDA cores: lane owns row lane / 2, columns (lane % 2) * 8 .. + 8.
    const int row = lane >> 1, col0 = (lane & 1) * 8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int k = 0; k < kdim; ++k) {
      const float av = kATransposed ? a[k * lda + row] : a[row * lda + k];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += av * (kBRowMajor ? b[k * ldb + col0 + j] : b[(col0 + j) * ldb + k]);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) c[row * ldc + col0 + j] = acc[j] + (accumulate ? c[row * ldc + col0 + j] : 0.f);
  } else {
    namespace wmma = nvcuda::wmma;
    using ALayout = std::conditional_t<kATransposed, wmma::col_major, wmma::row_major>;
    using BLayout = std::conditional_t<kBRowMajor, wmma::row_major, wmma::col_major>;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (accumulate) {
      wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.f);
    }
    for (int k = 0; k < kdim; k += 16) {
      wmma::load_matrix_sync(fa, kATransposed ? a + static_cast<int64_t>(k) * lda : a + k, lda);
      wmma::load_matrix_sync(fb, kBRowMajor ? b + static_cast<int64_t>(k) * ldb : b + k, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
  }
}

// v <- LN(v) * w + b for a row held VPL values per lane (columns lane + 32 j; 0 beyond D, and
// left 0 there). Two-pass statistics in registers.
template <int VPL>
__device__ __forceinline__ void row_layer_norm(float (&v)[VPL], const float* w, const float* b, int D, float eps,
                                               int lane) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < VPL; ++j) s += v[j];
  const float mean = warp_sum(s) / D;
  float q = 0.f;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const float c = lane + j * kWarp < D ? v[j] - mean : 0.f;
    q += c * c;
  }
  const float rstd = rsqrtf(warp_sum(q) / D + eps);
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int i = lane + j * kWarp;
    v[j] = i < D ? (v[j] - mean) * rstd * w[i] + b[i] : 0.f;
  }
}

// Hands out consecutive 128-byte-aligned buffers of a kernel's dynamic shared memory, in the order
// (and with the sizes) the kernel's *_shared_bytes function adds up.
struct SharedCarver {
  unsigned char* at;
  template <typename U>
  __device__ U* take(size_t count) {
    U* q = reinterpret_cast<U*>(at);
    at += align128(sizeof(U) * count);
    return q;
  }
};

template <typename T, int VPL>
__global__ void __launch_bounds__(kThreads, 2) adapter_block_fwd_kernel(Params p, TileShape t, const T* __restrict__ h,
                                                                     const T* __restrict__ r,
                                                                     const T* __restrict__ wd_op,
                                                                     const T* __restrict__ wu_op, T* __restrict__ y) {
  extern __shared__ __align__(128) unsigned char shared_raw[];
  const int BM = t.BM, DP = t.DP, KP = t.KP, D = p.D;
  SharedCarver carve{shared_raw};
  float* X = carve.take<float>(BM * DP);
  T* AN = carve.take<T>(BM * DP);
  float* Z = carve.take<float>(BM * KP);
  T* PK = carve.take<T>(BM * KP);
  float* STG = carve.take<float>(kWarps * 256);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t tiles = (p.M + BM - 1) / BM;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * BM;
    // ---- rows in: a = LN(h + r) or h, an = LN_a(a) or a; X = a_res + r ----
    // Two register arrays per lane (x, then a, then an, in place; and r) keep the kernel at two
    // blocks per multiprocessor for D <= 1024.
    for (int m = warp; m < BM; m += kWarps) {
      const int64_t row = row0 + m;
      const bool live = row < p.M;
      float x[VPL], rv[VPL];
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const int i = lane + j * kWarp;
        const bool in = live && i < D;
        x[j] = in ? to_float(h[row * D + i]) : 0.f;
        rv[j] = in ? to_float(r[row * D + i]) : 0.f;
      }
      auto store_residual = [&] {  // X = x + r, with x = h (residual before the LN) or a
#pragma unroll
        for (int j = 0; j < VPL; ++j)
          if (lane + j * kWarp < DP) X[m * DP + lane + j * kWarp] = x[j] + rv[j];
      };
      if (p.residual_before_ln) store_residual();
      if (p.orig_ln_before) {
#pragma unroll
        for (int j = 0; j < VPL; ++j) x[j] += rv[j];
        row_layer_norm<VPL>(x, p.gamma, p.beta, D, p.eps, lane);
      }
      if (!p.residual_before_ln) store_residual();
      if (p.ln_before) row_layer_norm<VPL>(x, p.ga, p.ba, D, p.eps_a, lane);
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const int i = lane + j * kWarp;
        if (i < DP) AN[m * DP + i] = from_float<T>(live && i < D ? x[j] : 0.f);
      }
    }
    __syncthreads();
    // ---- GEMM 1: Z = AN W_down^T, then PK = f(Z + b_down) ----
    const int mt = BM / 16, nt1 = KP / 16, nt2 = DP / 16;
    for (int job = warp; job < mt * nt1; job += kWarps) {
      const int m0 = (job % mt) * 16, n0 = (job / mt) * 16;
      warp_tile_gemm<T, false, false>(AN + m0 * DP, DP, wd_op + static_cast<int64_t>(n0) * DP, DP, DP, Z + m0 * KP + n0,
                                      KP, false, lane);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < BM * KP; e += kThreads) {
      const int k = e % KP;
      PK[e] = from_float<T>(k < p.K ? act(Z[e] + p.bd[k], p.act) : 0.f);
    }
    __syncthreads();
    // ---- GEMM 2: v = PK W_up^T; epilogue X += s * keep * (v + b_up) ----
    float* stg = STG + warp * 256;
    for (int job = warp; job < mt * nt2; job += kWarps) {
      const int m0 = (job % mt) * 16, n0 = (job / mt) * 16;
      warp_tile_gemm<T, false, false>(PK + m0 * KP, KP, wu_op + static_cast<int64_t>(n0) * KP, KP, KP, stg, 16, false,
                                      lane);
      __syncwarp();
      for (int e = lane; e < 256; e += kWarp) {
        const int m = m0 + e / 16, i = n0 + e % 16;
        const int64_t row = row0 + m;
        if (i < D && row < p.M)
          X[m * DP + i] += scale_at(p, i) * (stg[e] + p.bu[i]) * keep_factor(p, row * D + i);
      }
      __syncwarp();
    }
    __syncthreads();
    // ---- rows out: y = LN(o) ----
    for (int m = warp; m < BM; m += kWarps) {
      const int64_t row = row0 + m;
      if (row >= p.M) break;
      float o[VPL];
#pragma unroll
      for (int j = 0; j < VPL; ++j) o[j] = lane + j * kWarp < D ? X[m * DP + lane + j * kWarp] : 0.f;
      row_layer_norm<VPL>(o, p.gamma, p.beta, D, p.eps, lane);
#pragma unroll
      for (int j = 0; j < VPL; ++j)
        if (lane + j * kWarp < D) y[row * D + lane + j * kWarp] = from_float<T>(o[j]);
    }
    __syncthreads();  // X and AN are rewritten by the next tile
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: tiles of kBM = 16 rows per block of 8 warps, persistent over tiles; it recomputes the
// forward of its rows (nothing but the inputs is saved). Row phases run column-owner: thread t
// holds columns t, t + 256, ... (CPT of them) of all 16 rows, so the D-wide parameter gradients
// are per-thread sums over rows kept in registers across tiles (fixed order: deterministic), and
// row statistics are block reductions. The GEMMs run on tensor cores as in the forward:
//   z = an W_down^T, v = p W_up^T, dp = dv W_up, dan = dz W_down (block x weight),
//   dW_up += dv^T p, dW_down += dz^T an (read-modify-write of this block's padded fp32 slice).
// Shared memory per block:
//   X  fp32 [16][DP]  a_res + r, then o, then d o       V  fp32 [16][DP]  v, then d an
//   AD T    [16][DP]  an = LN_a(a) for GEMM 1, then d v, then an again (recomputed) for dW_down
//   Z  fp32 [16][KP]  z, then d z     PK, DZ T [16][KP]  f(z), d z      STG, RED, stats: staging,
//   reductions, row statistics. In all 16 (10 d + 8 k) bytes for fp16/bf16, 16 (12 d + 12 k) for fp32,
//   plus 8.75 KiB: bf16 fits Hopper's 227 KiB up to d = 1280 (k = 64), fp32 up to d = 1024, k = 128.
// Each block's slice of the [P, W] partial buffer holds the flat gradient layout (vectors at their
// offsets), then dW_up as [DP][KP] and dW_down as [KP][DP] (padded: every WMMA access is aligned);
// reduce_partials_kernel sums the slices and unpads.

// out[m] = sum over the block's threads of in[m], for the 16 rows at once (fixed order).
__device__ __forceinline__ void block_row_sums(float (&v)[kBM], float* red) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int m = 0; m < kBM; ++m) {
    const float s = warp_sum(v[m]);
    if (lane == 0) red[warp * kBM + m] = s;
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < kBM; ++m) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += red[w * kBM + m];
    v[m] = s;
  }
  __syncthreads();  // red is reused by the next call
}

// Column-owner tile of 16 rows: x[m][c] is row m, column threadIdx.x + 256 c.
template <int CPT>
using ColTile = float[kBM][CPT];

__device__ __forceinline__ int col_of(int c) { return threadIdx.x + c * kThreads; }

// (mean, rstd) of each row of x over its D columns (x holds 0 beyond D).
template <int CPT>
__device__ __forceinline__ void tile_row_stats(const ColTile<CPT>& x, int D, float eps, float* red, float (&mean)[kBM],
                                               float (&rstd)[kBM]) {
#pragma unroll
  for (int m = 0; m < kBM; ++m) {
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < CPT; ++c) s += x[m][c];
    mean[m] = s;
  }
  block_row_sums(mean, red);
#pragma unroll
  for (int m = 0; m < kBM; ++m) {
    mean[m] /= D;
    float q = 0.f;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      const float d = col_of(c) < D ? x[m][c] - mean[m] : 0.f;
      q += d * d;
    }
    rstd[m] = q;
  }
  block_row_sums(rstd, red);
#pragma unroll
  for (int m = 0; m < kBM; ++m) rstd[m] = rsqrtf(rstd[m] / D + eps);
}

// x <- (x - mean) * rstd, 0 beyond D.
template <int CPT>
__device__ __forceinline__ void tile_normalize(ColTile<CPT>& x, const float* mean, const float* rstd, int D) {
#pragma unroll
  for (int m = 0; m < kBM; ++m)
#pragma unroll
    for (int c = 0; c < CPT; ++c) x[m][c] = col_of(c) < D ? (x[m][c] - mean[m]) * rstd[m] : 0.f;
}

// LayerNorm backward in place: g (= dL/dx_hat, 0 beyond D) <- dL/dx, given x_hat.
template <int CPT>
__device__ __forceinline__ void tile_layer_norm_bwd(ColTile<CPT>& g, const ColTile<CPT>& xhat, const float* rstd,
                                                    int D, float* red) {
  float c1[kBM], c2[kBM];
#pragma unroll
  for (int m = 0; m < kBM; ++m) {
    c1[m] = 0.f;
    c2[m] = 0.f;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      c1[m] += g[m][c];
      c2[m] += g[m][c] * xhat[m][c];
    }
  }
  block_row_sums(c1, red);
  block_row_sums(c2, red);
#pragma unroll
  for (int m = 0; m < kBM; ++m)
#pragma unroll
    for (int c = 0; c < CPT; ++c)
      g[m][c] = col_of(c) < D ? (g[m][c] - c1[m] / D - xhat[m][c] * c2[m] / D) * rstd[m] : 0.f;
}

// dst[0..16) = mean, dst[16..32) = rstd (static indices: the arrays stay in registers).
__device__ __forceinline__ void save_stats(float* dst, const float (&mean)[kBM], const float (&rstd)[kBM]) {
#pragma unroll
  for (int m = 0; m < kBM; ++m) {
    dst[m] = mean[m];
    dst[kBM + m] = rstd[m];
  }
}

// x <- LN(x) * w + b over each row's D columns (0 beyond D); the rows' (mean, rstd) go to stats.
template <int CPT>
__device__ __forceinline__ void tile_layer_norm(ColTile<CPT>& x, const float* w, const float* b, int D, float eps,
                                                float* red, float* stats) {
  float mean[kBM], rstd[kBM];
  tile_row_stats<CPT>(x, D, eps, red, mean, rstd);
  tile_normalize<CPT>(x, mean, rstd, D);
#pragma unroll
  for (int m = 0; m < kBM; ++m)
#pragma unroll
    for (int c = 0; c < CPT; ++c)
      if (col_of(c) < D) x[m][c] = x[m][c] * w[col_of(c)] + b[col_of(c)];
  if (threadIdx.x == 0) save_stats(stats, mean, rstd);
}

template <typename T, int CPT>
__device__ __forceinline__ void load_tile(const T* src, int64_t row0, const Params& p, ColTile<CPT>& x) {
#pragma unroll
  for (int m = 0; m < kBM; ++m)
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      const int64_t row = row0 + m;
      x[m][c] = row < p.M && col_of(c) < p.D ? to_float(src[row * p.D + col_of(c)]) : 0.f;
    }
}

// x1_hat = (h + r - mean1) rstd1 (h itself without the LayerNorm before the adapter) and a_hat =
// (a - mean_a) rstd_a (a itself without LN_a) of a tile, from the saved row statistics. h and r are
// read again (in cache), so nothing of them is held between phases.
template <typename T, int CPT>
__device__ __forceinline__ void tile_inputs(const Params& p, const T* h, const T* r, int64_t row0, const float* stats,
                                            ColTile<CPT>& x1hat, ColTile<CPT>& ahat) {
  ColTile<CPT> rv;
  load_tile<T, CPT>(h, row0, p, x1hat);
  load_tile<T, CPT>(r, row0, p, rv);
#pragma unroll
  for (int m = 0; m < kBM; ++m)
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      const int i = col_of(c);
      float a = x1hat[m][c];
      if (p.orig_ln_before && i < p.D) {
        x1hat[m][c] = (a + rv[m][c] - stats[2 * kBM + m]) * stats[3 * kBM + m];
        a = x1hat[m][c] * p.gamma[i] + p.beta[i];
      }
      ahat[m][c] = p.ln_before && i < p.D ? (a - stats[m]) * stats[kBM + m] : a;
    }
}

template <typename T, int CPT>
__global__ void __launch_bounds__(kThreads, 1) adapter_block_bwd_kernel(
    Params p, int DP, int KP, Offsets off, Slice sl, bool ln_grad, bool input_grad, const T* __restrict__ dy,
    const T* __restrict__ h, const T* __restrict__ r, const T* __restrict__ wd_op, const T* __restrict__ wu_op,
    T* __restrict__ dh, T* __restrict__ dr, float* __restrict__ part) {
  extern __shared__ __align__(128) unsigned char shared_raw[];
  SharedCarver carve{shared_raw};
  float* X = carve.take<float>(kBM * DP);
  float* V = carve.take<float>(kBM * DP);
  T* AD = carve.take<T>(kBM * DP);
  float* Z = carve.take<float>(kBM * KP);
  T* PK = carve.take<T>(kBM * KP);
  T* DZ = carve.take<T>(kBM * KP);
  float* STG = carve.take<float>(kWarps * 256);
  float* RED = carve.take<float>(kWarps * kBM);
  float* stats = carve.take<float>(4 * kBM);  // per row: mean_a, rstd_a, mean1, rstd1
  const int D = p.D, K = p.K, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  float* slice = part + blockIdx.x * sl.width;
  // this thread's columns of the D-wide parameter gradients, summed over all rows of the block
  float g_bu[CPT] = {}, g_gamma[CPT] = {}, g_beta[CPT] = {}, g_ga[CPT] = {}, g_ba[CPT] = {}, g_s[CPT] = {};
  float g_s1 = 0.f;  // learned scalar scaling
  const int64_t tiles = (p.M + kBM - 1) / kBM;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * kBM;
    const bool first = tile == blockIdx.x;
    // ---- forward rows: X = a_res + r, AD = LN_a(a) ----
    {
      ColTile<CPT> x, rv;
      load_tile<T, CPT>(h, row0, p, x);
      load_tile<T, CPT>(r, row0, p, rv);
      auto store_residual = [&] {
#pragma unroll
        for (int m = 0; m < kBM; ++m)
#pragma unroll
          for (int c = 0; c < CPT; ++c)
            if (col_of(c) < DP) X[m * DP + col_of(c)] = x[m][c] + rv[m][c];
      };
      if (p.residual_before_ln) store_residual();
      if (p.orig_ln_before) {
#pragma unroll
        for (int m = 0; m < kBM; ++m)
#pragma unroll
          for (int c = 0; c < CPT; ++c) x[m][c] += rv[m][c];
        tile_layer_norm<CPT>(x, p.gamma, p.beta, D, p.eps, RED, stats + 2 * kBM);
      }
      if (!p.residual_before_ln) store_residual();
      if (p.ln_before) tile_layer_norm<CPT>(x, p.ga, p.ba, D, p.eps_a, RED, stats);
#pragma unroll
      for (int m = 0; m < kBM; ++m)
#pragma unroll
        for (int c = 0; c < CPT; ++c)
          if (col_of(c) < DP) AD[m * DP + col_of(c)] = from_float<T>(row0 + m < p.M ? x[m][c] : 0.f);
    }
    __syncthreads();
    // ---- z = an W_down^T + b_down, p = f(z); v = p W_up^T ----
    for (int n0 = warp * 16; n0 < KP; n0 += kWarps * 16)
      warp_tile_gemm<T, false, false>(AD, DP, wd_op + static_cast<int64_t>(n0) * DP, DP, DP, Z + n0, KP, false, lane);
    __syncthreads();
    for (int e = threadIdx.x; e < kBM * KP; e += kThreads) {
      const int k = e % KP;
      const float z = k < K ? Z[e] + p.bd[k] : 0.f;
      Z[e] = z;
      PK[e] = from_float<T>(k < K ? act(z, p.act) : 0.f);
    }
    __syncthreads();
    for (int n0 = warp * 16; n0 < DP; n0 += kWarps * 16)
      warp_tile_gemm<T, false, false>(PK, KP, wu_op + static_cast<int64_t>(n0) * KP, KP, KP, V + n0, DP, false, lane);
    __syncthreads();
    // ---- output LayerNorm and the scaled, dropped-out up-projection: X <- d o, AD <- d v ----
    {
      ColTile<CPT> o, d;
      float mean[kBM], rstd[kBM];
#pragma unroll
      for (int m = 0; m < kBM; ++m)
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
          const int i = col_of(c);
          const int64_t row = row0 + m;
          const bool in = row < p.M && i < D;
          const float v = in ? V[m * DP + i] + p.bu[i] : 0.f;
          o[m][c] = in ? X[m * DP + i] + scale_at(p, i) * v * keep_factor(p, row * D + i) : 0.f;
          d[m][c] = in ? to_float(dy[row * D + i]) : 0.f;
          if (in) V[m * DP + i] = v;
        }
      tile_row_stats<CPT>(o, D, p.eps, RED, mean, rstd);
      tile_normalize<CPT>(o, mean, rstd, D);  // o <- o_hat
#pragma unroll
      for (int m = 0; m < kBM; ++m)
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
          const int i = col_of(c);
          if (ln_grad && i < D) {
            g_gamma[c] += d[m][c] * o[m][c];
            g_beta[c] += d[m][c];
          }
          d[m][c] = i < D ? d[m][c] * p.gamma[i] : 0.f;
        }
      tile_layer_norm_bwd<CPT>(d, o, rstd, D, RED);  // d <- d o
#pragma unroll
      for (int m = 0; m < kBM; ++m)
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
          const int i = col_of(c);
          const int64_t row = row0 + m;
          const bool in = row < p.M && i < D;
          const float du = in ? d[m][c] * keep_factor(p, row * D + i) : 0.f;
          const float dv = in ? du * scale_at(p, i) : 0.f;
          if (in) {
            const float v = V[m * DP + i];
            if (p.scale_mode == AMPFUSE_SCALE_CHANNEL) g_s[c] += du * v;
            if (p.scale_mode == AMPFUSE_SCALE_SCALAR) g_s1 += du * v;
            g_bu[c] += dv;
          }
          if (i < DP) {
            X[m * DP + i] = in ? d[m][c] : 0.f;
            AD[m * DP + i] = from_float<T>(dv);
          }
        }
    }
    __syncthreads();
    // ---- dz = (dv W_up) f'(z); W_up partials ----
    for (int n0 = warp * 16; n0 < KP; n0 += kWarps * 16) {
      float* stg = STG + warp * 256;
      warp_tile_gemm<T, false, true>(AD, DP, wu_op + n0, KP, DP, stg, 16, false, lane);
      __syncwarp();
      for (int e = lane; e < 256; e += kWarp) {
        const int m = e / 16, k = n0 + e % 16;
        const float dz = k < K && row0 + m < p.M ? stg[e] * act_grad(Z[m * KP + k], p.act) : 0.f;
        Z[m * KP + k] = dz;
        DZ[m * KP + k] = from_float<T>(dz);
      }
      __syncwarp();
    }
    for (int job = warp; job < (DP / 16) * (KP / 16); job += kWarps) {
      const int i0 = (job / (KP / 16)) * 16, k0 = (job % (KP / 16)) * 16;
      warp_tile_gemm<T, true, true>(AD + i0, DP, PK + k0, KP, kBM, slice + sl.wu + static_cast<int64_t>(i0) * KP + k0,
                                    KP, !first, lane);  // dW_up tile += dv^T p
    }
    __syncthreads();
    // ---- b_down partials; dan = dz W_down ----
    for (int k = threadIdx.x; k < K; k += kThreads) {
      float s = 0.f;
      for (int m = 0; m < kBM; ++m) s += Z[m * KP + k];
      slice[off.b_down + k] = s + (first ? 0.f : slice[off.b_down + k]);
    }
    for (int n0 = warp * 16; n0 < DP; n0 += kWarps * 16)
      warp_tile_gemm<T, false, true>(DZ, KP, wd_op + n0, DP, KP, V + n0, DP, false, lane);
    __syncthreads();
    // ---- adapter LayerNorm, residual, LayerNorm before the adapter: dh, dr ----
    {
      ColTile<CPT> x1hat, ahat, g;
      tile_inputs<T, CPT>(p, h, r, row0, stats, x1hat, ahat);
      // an again, for dW_down += dz^T an (AD held d v until now)
#pragma unroll
      for (int m = 0; m < kBM; ++m)
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
          const int i = col_of(c);
          const float an = p.ln_before && i < D ? ahat[m][c] * p.ga[i] + p.ba[i] : ahat[m][c];
          if (i < DP) AD[m * DP + i] = from_float<T>(row0 + m < p.M ? an : 0.f);
        }
      __syncthreads();
      for (int job = warp; job < (DP / 16) * (KP / 16); job += kWarps) {
        const int k0 = (job / (DP / 16)) * 16, i0 = (job % (DP / 16)) * 16;
        // dW_down tile += dz^T an
        warp_tile_gemm<T, true, true>(DZ + k0, KP, AD + i0, DP, kBM, slice + sl.wd + static_cast<int64_t>(k0) * DP + i0,
                                      DP, !first, lane);
      }
#pragma unroll
      for (int m = 0; m < kBM; ++m)
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
          const int i = col_of(c);
          g[m][c] = i < D && row0 + m < p.M ? V[m * DP + i] : 0.f;  // d an
          if (p.ln_before && i < D) {
            g_ga[c] += g[m][c] * ahat[m][c];
            g_ba[c] += g[m][c];
            g[m][c] *= p.ga[i];
          }
        }
      if (p.ln_before) tile_layer_norm_bwd<CPT>(g, ahat, stats + kBM, D, RED);  // g <- d a
#pragma unroll
      for (int m = 0; m < kBM; ++m)
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
          const int i = col_of(c);
          if (!p.residual_before_ln && i < D) g[m][c] += X[m * DP + i];
          if (p.orig_ln_before && i < D) {
            if (ln_grad) {
              g_gamma[c] += g[m][c] * x1hat[m][c];
              g_beta[c] += g[m][c];
            }
            g[m][c] *= p.gamma[i];
          }
        }
      if (p.orig_ln_before) tile_layer_norm_bwd<CPT>(g, x1hat, stats + 3 * kBM, D, RED);  // g <- d (h + r)
      if (input_grad) {
#pragma unroll
        for (int m = 0; m < kBM; ++m)
#pragma unroll
          for (int c = 0; c < CPT; ++c) {
            const int i = col_of(c);
            const int64_t row = row0 + m;
            if (row >= p.M || i >= D) continue;
            // g is d(h + r) after the LayerNorm before the adapter, else d a = d h (a is h then)
            const float d_o = X[m * DP + i];
            dh[row * D + i] = from_float<T>((p.residual_before_ln ? d_o : 0.f) + g[m][c]);
            dr[row * D + i] = from_float<T>(d_o + (p.orig_ln_before ? g[m][c] : 0.f));
          }
      }
    }
    __syncthreads();  // the next tile rewrites every buffer
  }
  // ---- this block's D-wide gradients ----
#pragma unroll
  for (int c = 0; c < CPT; ++c) {
    const int i = col_of(c);
    if (i >= D) continue;
    slice[off.b_up + i] = g_bu[c];
    if (ln_grad) {
      slice[off.gamma + i] = g_gamma[c];
      slice[off.beta + i] = g_beta[c];
    }
    if (p.ln_before) {
      slice[off.ga + i] = g_ga[c];
      slice[off.ba + i] = g_ba[c];
    }
    if (p.scale_mode == AMPFUSE_SCALE_CHANNEL) slice[off.scale + i] = g_s[c];
  }
  if (p.scale_mode == AMPFUSE_SCALE_SCALAR) {  // one block-wide sum (block_row_sums sums 16 rows; only row 0 is used)
    float s[kBM] = {};
    s[0] = g_s1;
    block_row_sums(s, RED);
    if (threadIdx.x == 0) slice[off.scale] = s[0];
  }
}

// flat[t] = sum over the P slices of gradient t; W_up and W_down are read from their padded places.
__global__ void reduce_partials_kernel(const float* __restrict__ part, float* __restrict__ flat, int64_t P,
                                       int64_t total, Slice sl, Offsets off, int D, int K, int DP, int KP) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= total) return;
  const int64_t DK = static_cast<int64_t>(D) * K;
  int64_t src = t;
  if (t >= off.w_up && t < off.w_up + DK) src = sl.wu + (t - off.w_up) / K * KP + (t - off.w_up) % K;
  if (t >= off.w_down && t < off.w_down + DK) src = sl.wd + (t - off.w_down) / D * DP + (t - off.w_down) % D;
  float acc = 0.f;
  for (int64_t q = 0; q < P; ++q) acc += part[q * sl.width + src];
  flat[t] = acc;
}

// The forward for a row width (values per lane), the backward for a column count (per thread).
template <typename T>
auto* fwd_kernel_for(int D) {
  if (D <= 128) return adapter_block_fwd_kernel<T, 4>;
  if (D <= 512) return adapter_block_fwd_kernel<T, 16>;
  if (D <= 1024) return adapter_block_fwd_kernel<T, 32>;
  return adapter_block_fwd_kernel<T, 64>;
}

// Two tile widths per dtype, not one per power of two: each is a straight-line kernel that dominates
// the build (README, "The CUDA extension"). Below d = 1024 part of a thread's 4-column tile is padding,
// masked work on registers; the bytes moved are the same. The host checks DP <= top_cpt<T>() * kThreads.
template <typename T>
auto* bwd_kernel_for(int DP) {
  return DP <= 4 * kThreads ? adapter_block_bwd_kernel<T, 4> : adapter_block_bwd_kernel<T, top_cpt<T>()>;
}

template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace

template <typename T>
cudaError_t launch_fwd(const FwdArgs<T>& a, size_t shared, Device device) {
  auto kernel = fwd_kernel_for<T>(a.p.D);
  int per_sm = 0;
  cudaError_t status = allow_shared(kernel, shared);
  if (status == cudaSuccess) status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, shared);
  if (status != cudaSuccess) return status;
  kernel<<<grid_size((a.p.M + a.tile.BM - 1) / a.tile.BM, per_sm, device.sms), kThreads, shared, device.stream>>>(
      a.p, a.tile, a.h, a.r, a.w_down, a.w_up, a.y);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_programs(const BwdArgs<T>& a, size_t shared, Device device, int* programs) {
  auto kernel = bwd_kernel_for<T>(a.DP);
  int per_sm = 0;
  cudaError_t status = allow_shared(kernel, shared);
  if (status == cudaSuccess) status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, shared);
  *programs = grid_size((a.p.M + kBM - 1) / kBM, std::min(std::max(per_sm, 1), 2), device.sms);
  return status;
}

template <typename T>
cudaError_t launch_bwd(const BwdArgs<T>& a, size_t shared, Device device, int programs, float* part, float* flat,
                       int64_t total) {
  auto kernel = bwd_kernel_for<T>(a.DP);
  cudaError_t status = allow_shared(kernel, shared);  // as bwd_programs does: each launcher stands alone
  if (status != cudaSuccess) return status;
  kernel<<<programs, kThreads, shared, device.stream>>>(a.p, a.DP, a.KP, a.off, a.sl, a.ln_grad, a.input_grad, a.dy,
                                                        a.h, a.r, a.w_down, a.w_up, a.dh, a.dr, part);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  const int threads = 256;
  reduce_partials_kernel<<<static_cast<int>((total + threads - 1) / threads), threads, 0, device.stream>>>(
      part, flat, programs, total, a.sl, a.off, a.p.D, a.p.K, a.DP, a.KP);
  return cudaGetLastError();
}

}  // namespace ampfuse::adapter_cuda

// The launchers for one dtype, in the translation unit that includes this header for it. The launchers
// use this header's internal kernels, so each is instantiated in that unit alone (the .h's extern
// declarations keep the other dtypes out).
#define AMPFUSE_INSTANTIATE_LAUNCHERS(T) \
  namespace ampfuse::adapter_cuda {      \
  AMPFUSE_LAUNCHERS(, T)                 \
  }
