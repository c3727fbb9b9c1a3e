// Adapter block (DESIGN.md section 2) in CUDA C++.
//
// Forward: row tiles per block of 8 warps, LayerNorms a warp per row with the row in registers,
// the two bottleneck GEMMs on tensor cores (WMMA) for fp16/bf16 (see adapter_block_fwd_kernel).
// Backward: still the first, correctness-first version: one warp owns one row at a time, the
// bottleneck as warp-wide dot products (CUDA cores), each one-warp block adding its rows'
// parameter gradients to its own fp32 slice of a [P, T] buffer (no atomics: deterministic),
// then a reduction kernel. It is far slower than the Triton backward (benchmarks/results/).
// Dropout uses the same Philox4x32-10 stream and counter layout as Triton's tl.rand, so masks
// match the Triton kernels bit for bit.
//
// Vector parameters arrive as fp32 (the Python side converts), hidden states as fp32/fp16/bf16.

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <limits>
#include <type_traits>

#include "adapter_block.h"

namespace ampfuse {
namespace {

constexpr int kWarp = 32;

// fp32, fp16 and bf16 activations (the Python side rejects other dtypes before calling in).
#define AMPFUSE_DISPATCH(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                 \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

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
    case 1: return fmaxf(z, 0.f);
    case 2: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case 3: return 0.5f * z * (1.f + tanhf(0.7978845608028654f * (z + 0.044715f * z * z * z)));
    case 4: return z / (1.f + expf(-z));
    case 5: return tanhf(z);
    default: return z;
  }
}

__device__ __forceinline__ float act_grad(float z, int code) {
  switch (code) {
    case 1: return z > 0.f ? 1.f : 0.f;
    case 2: return 0.5f * (1.f + erff(z * 0.70710678118654752f)) + z * 0.3989422804014327f * expf(-0.5f * z * z);
    case 3: {
      const float t = tanhf(0.7978845608028654f * (z + 0.044715f * z * z * z));
      return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * 0.7978845608028654f * (1.f + 3.f * 0.044715f * z * z);
    }
    case 4: { const float s = 1.f / (1.f + expf(-z)); return s * (1.f + z * (1.f - s)); }
    case 5: { const float t = tanhf(z); return 1.f - t * t; }
    default: return 1.f;
  }
}

struct Params {
  const float *gamma, *beta, *ga, *ba, *wd, *bd, *wu, *bu, *scale;
  const int64_t* seed;
  float scale_value, eps, eps_a, p_drop;
  int64_t M;
  int D, K, act, scale_mode;  // scale_mode: 0 float, 1 learned scalar, 2 per channel
  bool orig_ln_before, ln_before, residual_before_ln, dropout;
};

__device__ __forceinline__ float scale_at(const Params& p, int i) {
  return p.scale_mode == 2 ? p.scale[i] : (p.scale_mode == 1 ? p.scale[0] : p.scale_value);
}

__device__ __forceinline__ float keep_factor(const Params& p, int64_t index) {
  if (!p.dropout) return 1.f;
  return philox_uniform(static_cast<uint64_t>(*p.seed), static_cast<uint64_t>(index)) >= p.p_drop
             ? 1.f / (1.f - p.p_drop) : 0.f;
}

// Row statistics of buf[0..D) (mean, 1/std), two passes over shared memory.
__device__ __forceinline__ void row_stats(const float* buf, int D, float eps, int lane, float& mean, float& rstd) {
  float s = 0.f;
  for (int i = lane; i < D; i += kWarp) s += buf[i];
  mean = warp_sum(s) / D;
  float v = 0.f;
  for (int i = lane; i < D; i += kWarp) { const float c = buf[i] - mean; v += c * c; }
  rstd = rsqrtf(warp_sum(v) / D + eps);
}

// Forward of one row up to v: fills a, an (D floats each) and z, pk (K floats each) in shared memory.
template <typename T>
__device__ void row_forward(const Params& p, const T* h, const T* r, float* a, float* an, float* z, float* pk,
                            int lane, float& mean1, float& rstd1, float& mean_a, float& rstd_a) {
  const int D = p.D;
  for (int i = lane; i < D; i += kWarp)
    a[i] = static_cast<float>(h[i]) + (p.orig_ln_before ? static_cast<float>(r[i]) : 0.f);
  __syncwarp();
  if (p.orig_ln_before) {
    row_stats(a, D, p.eps, lane, mean1, rstd1);
    for (int i = lane; i < D; i += kWarp) a[i] = (a[i] - mean1) * rstd1 * p.gamma[i] + p.beta[i];
  }
  __syncwarp();
  if (p.ln_before) {
    row_stats(a, D, p.eps_a, lane, mean_a, rstd_a);
    for (int i = lane; i < D; i += kWarp) an[i] = (a[i] - mean_a) * rstd_a * p.ga[i] + p.ba[i];
  } else {
    for (int i = lane; i < D; i += kWarp) an[i] = a[i];
  }
  __syncwarp();
  for (int j = 0; j < p.K; ++j) {
    float s = 0.f;
    for (int i = lane; i < D; i += kWarp) s += an[i] * p.wd[static_cast<int64_t>(j) * D + i];
    s = warp_sum(s) + p.bd[j];
    if (lane == 0) { z[j] = s; pk[j] = act(s, p.act); }
  }
  __syncwarp();
}

__device__ __forceinline__ float up_projection(const Params& p, const float* pk, int i) {
  float v = p.bu[i];
  const float* w = p.wu + static_cast<int64_t>(i) * p.K;
  for (int j = 0; j < p.K; ++j) v += pk[j] * w[j];
  return v;
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

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarp;

template <typename T> struct Native { using type = T; };
template <> struct Native<c10::Half> { using type = __half; };
template <> struct Native<c10::BFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// acc(16x16 fp32, stored row-major with leading dimension ldc) = A[16 x kdim] (row-major in shared
// memory, leading dimension lda) times B, where B(k, n) = b[n * ldb + k] (a row-major weight read
// as its transpose; global memory). One warp per call; kdim a multiple of 16.
template <typename T>
__device__ __forceinline__ void warp_tile_gemm(const T* a, int lda, const T* b, int ldb, int kdim, float* c,
                                               int ldc, int lane) {
  if constexpr (std::is_same_v<T, float>) {
    // CUDA cores: lane owns row lane / 2, columns (lane % 2) * 8 .. + 8.
    const int row = lane >> 1, col0 = (lane & 1) * 8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int k = 0; k < kdim; ++k) {
      const float av = a[row * lda + k];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += av * b[(col0 + j) * ldb + k];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) c[row * ldc + col0 + j] = acc[j];
  } else {
    namespace wmma = nvcuda::wmma;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int k = 0; k < kdim; k += 16) {
      wmma::load_matrix_sync(fa, a + k, lda);
      wmma::load_matrix_sync(fb, b + k, ldb);
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

struct TileShape {
  int BM, DP, KP;
};

__host__ __device__ inline size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

template <typename T>
__host__ __device__ inline size_t fwd_shared_bytes(TileShape t) {
  return align128(sizeof(float) * t.BM * t.DP) + align128(sizeof(T) * t.BM * t.DP) +
         align128(sizeof(float) * t.BM * t.KP) + align128(sizeof(T) * t.BM * t.KP) +
         sizeof(float) * kWarps * 256;
}

template <typename T, int VPL>
__global__ void __launch_bounds__(kThreads, 2) adapter_block_fwd_kernel(Params p, TileShape t, const T* __restrict__ h,
                                                                     const T* __restrict__ r,
                                                                     const T* __restrict__ wd_op,
                                                                     const T* __restrict__ wu_op, T* __restrict__ y) {
  extern __shared__ __align__(128) unsigned char shared_raw[];
  const int BM = t.BM, DP = t.DP, KP = t.KP, D = p.D;
  float* X = reinterpret_cast<float*>(shared_raw);
  T* AN = reinterpret_cast<T*>(shared_raw + align128(sizeof(float) * BM * DP));
  float* Z = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(AN) + align128(sizeof(T) * BM * DP));
  T* PK = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(Z) + align128(sizeof(float) * BM * KP));
  float* STG = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(PK) + align128(sizeof(T) * BM * KP));
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
      warp_tile_gemm<T>(AN + m0 * DP, DP, wd_op + static_cast<int64_t>(n0) * DP, DP, DP, Z + m0 * KP + n0, KP, lane);
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
      warp_tile_gemm<T>(PK + m0 * KP, KP, wu_op + static_cast<int64_t>(n0) * KP, KP, KP, stg, 16, lane);
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

struct Offsets {  // into a program's slice of the partial buffer; -1 when not computed
  int64_t w_up, w_down, b_up, b_down, scale, gamma, beta, ga, ba;
};

template <typename T>
__global__ void adapter_block_bwd_kernel(Params p, Offsets off, int64_t T_width, bool ln_grad, bool input_grad,
                                         const T* __restrict__ dy, const T* __restrict__ h,
                                         const T* __restrict__ r, T* __restrict__ dh, T* __restrict__ dr,
                                         float* __restrict__ part) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x;
  const int D = p.D, K = p.K;
  float *a = smem, *an = a + D, *o = an + D, *g = o + D, *dan = g + D, *z = dan + D, *pk = z + K, *dz = pk + K;
  float* slice = part + blockIdx.x * T_width;
  for (int64_t t = lane; t < T_width; t += kWarp) slice[t] = 0.f;
  float d_scale = 0.f;
  __syncwarp();
  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    const T *hr = h + row * D, *rr = r + row * D, *dyr = dy + row * D;
    float mean1 = 0.f, rstd1 = 1.f, mean_a = 0.f, rstd_a = 1.f;
    row_forward(p, hr, rr, a, an, z, pk, lane, mean1, rstd1, mean_a, rstd_a);
    for (int i = lane; i < D; i += kWarp) {
      const float v = up_projection(p, pk, i);
      o[i] = scale_at(p, i) * v * keep_factor(p, row * D + i) +
             (p.residual_before_ln ? static_cast<float>(hr[i]) : a[i]) + static_cast<float>(rr[i]);
    }
    __syncwarp();
    float mean_o, rstd_o;
    row_stats(o, D, p.eps, lane, mean_o, rstd_o);
    // output LayerNorm: o <- o_hat, g <- dy * gamma
    float c1 = 0.f, c2 = 0.f;
    for (int i = lane; i < D; i += kWarp) {
      const float ohat = (o[i] - mean_o) * rstd_o, d = static_cast<float>(dyr[i]);
      o[i] = ohat;
      g[i] = d * p.gamma[i];
      c1 += g[i];
      c2 += g[i] * ohat;
      if (ln_grad) { slice[off.gamma + i] += d * ohat; slice[off.beta + i] += d; }
    }
    c1 = warp_sum(c1) / D;
    c2 = warp_sum(c2) / D;
    __syncwarp();
    // g <- d o; dan <- d v (scaled, dropped out); up-projection weight gradients
    for (int i = lane; i < D; i += kWarp) {
      const float d_o = (g[i] - c1 - o[i] * c2) * rstd_o;
      const float du = d_o * keep_factor(p, row * D + i);
      const float v = up_projection(p, pk, i);
      if (p.scale_mode == 2) slice[off.scale + i] += du * v;
      if (p.scale_mode == 1) d_scale += du * v;
      const float dv = du * scale_at(p, i);
      g[i] = d_o;
      dan[i] = dv;
      slice[off.b_up + i] += dv;
      float* dwu = slice + off.w_up + static_cast<int64_t>(i) * K;
      for (int j = 0; j < K; ++j) dwu[j] += dv * pk[j];
    }
    __syncwarp();
    for (int j = 0; j < K; ++j) {
      float s = 0.f;
      for (int i = lane; i < D; i += kWarp) s += dan[i] * p.wu[static_cast<int64_t>(i) * K + j];
      s = warp_sum(s) * act_grad(z[j], p.act);
      if (lane == 0) { dz[j] = s; slice[off.b_down + j] += s; }
    }
    __syncwarp();
    // dan <- d an; down-projection weight gradients
    for (int i = lane; i < D; i += kWarp) {
      float s = 0.f;
      for (int j = 0; j < K; ++j) {
        s += dz[j] * p.wd[static_cast<int64_t>(j) * D + i];
        slice[off.w_down + static_cast<int64_t>(j) * D + i] += dz[j] * an[i];
      }
      dan[i] = s;
    }
    __syncwarp();
    // adapter LayerNorm: dan <- d a
    if (p.ln_before) {
      float s1 = 0.f, s2 = 0.f;
      for (int i = lane; i < D; i += kWarp) {
        const float ahat = (a[i] - mean_a) * rstd_a, gd = dan[i] * p.ga[i];
        slice[off.ga + i] += dan[i] * ahat;
        slice[off.ba + i] += dan[i];
        s1 += gd;
        s2 += gd * ahat;
      }
      s1 = warp_sum(s1) / D;
      s2 = warp_sum(s2) / D;
      __syncwarp();
      for (int i = lane; i < D; i += kWarp) {
        const float ahat = (a[i] - mean_a) * rstd_a;
        dan[i] = (dan[i] * p.ga[i] - s1 - ahat * s2) * rstd_a;
      }
      __syncwarp();
    }
    // residual and the LayerNorm before the adapter: an <- d x1 (reusing the buffer)
    if (!p.residual_before_ln)
      for (int i = lane; i < D; i += kWarp) dan[i] += g[i];
    __syncwarp();
    if (p.orig_ln_before) {
      float s1 = 0.f, s2 = 0.f;
      for (int i = lane; i < D; i += kWarp) {
        const float xh = (static_cast<float>(hr[i]) + static_cast<float>(rr[i]) - mean1) * rstd1;
        const float gd = dan[i] * p.gamma[i];
        if (ln_grad) { slice[off.gamma + i] += dan[i] * xh; slice[off.beta + i] += dan[i]; }
        s1 += gd;
        s2 += gd * xh;
      }
      s1 = warp_sum(s1) / D;
      s2 = warp_sum(s2) / D;
      __syncwarp();
      for (int i = lane; i < D; i += kWarp) {
        const float xh = (static_cast<float>(hr[i]) + static_cast<float>(rr[i]) - mean1) * rstd1;
        an[i] = (dan[i] * p.gamma[i] - s1 - xh * s2) * rstd1;
      }
    } else {
      for (int i = lane; i < D; i += kWarp) an[i] = dan[i];
    }
    __syncwarp();
    if (input_grad) {
      for (int i = lane; i < D; i += kWarp) {
        const float direct = p.residual_before_ln ? g[i] : 0.f;
        dh[row * D + i] = static_cast<T>(direct + an[i]);
        dr[row * D + i] = static_cast<T>(g[i] + (p.orig_ln_before ? an[i] : 0.f));
      }
    }
    __syncwarp();
  }
  d_scale = warp_sum(d_scale);
  if (p.scale_mode == 1 && lane == 0) slice[off.scale] = d_scale;
}

__global__ void reduce_partials_kernel(const float* __restrict__ part, float* __restrict__ out, int64_t P,
                                       int64_t T_width) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= T_width) return;
  float acc = 0.f;
  for (int64_t q = 0; q < P; ++q) acc += part[q * T_width + t];
  out[t] = acc;
}

const float* fp32_ptr(const c10::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

Params make_params(const at::Tensor& h, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                   const at::Tensor& w_down, const at::Tensor& b_down, const at::Tensor& w_up,
                   const at::Tensor& b_up, const c10::optional<at::Tensor>& scale,
                   const c10::optional<at::Tensor>& adapter_ln_weight, const c10::optional<at::Tensor>& adapter_ln_bias,
                   double scale_value, double ln_eps, double adapter_ln_eps, int64_t activation,
                   bool original_ln_before, bool residual_before_ln, double dropout_p,
                   const c10::optional<at::Tensor>& seed) {
  Params p{};
  p.gamma = ln_weight.data_ptr<float>();
  p.beta = ln_bias.data_ptr<float>();
  p.ga = fp32_ptr(adapter_ln_weight);
  p.ba = fp32_ptr(adapter_ln_bias);
  const bool fp32_weights = w_down.scalar_type() == at::kFloat;  // the backward's; the forward's are padded
  p.wd = fp32_weights ? w_down.data_ptr<float>() : nullptr;
  p.bd = b_down.data_ptr<float>();
  p.wu = fp32_weights ? w_up.data_ptr<float>() : nullptr;
  p.bu = b_up.data_ptr<float>();
  p.scale = fp32_ptr(scale);
  p.scale_mode = !scale ? 0 : (scale->numel() > 1 ? 2 : 1);
  p.seed = seed ? seed->data_ptr<int64_t>() : nullptr;
  p.scale_value = static_cast<float>(scale_value);
  p.eps = static_cast<float>(ln_eps);
  p.eps_a = static_cast<float>(adapter_ln_eps);
  p.p_drop = static_cast<float>(dropout_p);
  p.M = h.size(0);
  p.D = static_cast<int>(h.size(1));
  p.K = static_cast<int>(b_down.size(0));
  p.act = static_cast<int>(activation);
  p.orig_ln_before = original_ln_before;
  p.ln_before = adapter_ln_weight.has_value();
  p.residual_before_ln = residual_before_ln;
  p.dropout = dropout_p > 0 && seed.has_value();
  return p;
}

// A persistent grid: `per_sm` blocks per multiprocessor, never more than there are work items (rows
// or row tiles). The backward keeps it at 2, since each block owns a full partial-gradient slice.
int grid_size(int64_t rows, int per_sm) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<int>(std::min<int64_t>(rows, static_cast<int64_t>(per_sm) * sms));
}

template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Set by the tests (through set_poison_outputs): every output starts as NaN, so an element a kernel
// forgets to write fails the comparison instead of passing on whatever the allocator left there.
bool poison_outputs = false;

at::Tensor new_output(const at::Tensor& like) {
  return poison_outputs ? at::full_like(like, std::numeric_limits<float>::quiet_NaN()) : at::empty_like(like);
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return poison_outputs ? at::full(sizes, std::numeric_limits<float>::quiet_NaN(), options) : at::empty(sizes, options);
}

}  // namespace

void set_poison_outputs(bool on) { poison_outputs = on; }

// w_down, w_up: padded to (KP, DP) and (DP, KP), in h's dtype (ampfuse/ops/cuda.py prepares them).
at::Tensor adapter_block_fwd(const at::Tensor& h, const at::Tensor& r, const at::Tensor& ln_weight,
                             const at::Tensor& ln_bias, const at::Tensor& w_down, const at::Tensor& b_down,
                             const at::Tensor& w_up, const at::Tensor& b_up, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& adapter_ln_weight,
                             const c10::optional<at::Tensor>& adapter_ln_bias, double scale_value, double ln_eps,
                             double adapter_ln_eps, int64_t activation, bool original_ln_before,
                             bool residual_before_ln, double dropout_p, const c10::optional<at::Tensor>& seed) {
  TORCH_CHECK(h.is_cuda() && h.dim() == 2 && h.is_contiguous(), "h must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(r.sizes() == h.sizes() && r.scalar_type() == h.scalar_type() && r.is_contiguous(),
              "r must match h in shape and dtype and be contiguous");
  const c10::cuda::CUDAGuard guard(h.device());
  Params p = make_params(h, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight,
                         adapter_ln_bias, scale_value, ln_eps, adapter_ln_eps, activation, original_ln_before,
                         residual_before_ln, dropout_p, seed);
  const TileShape shape{16, static_cast<int>(w_down.size(1)), static_cast<int>(w_down.size(0))};
  TORCH_CHECK(w_down.scalar_type() == h.scalar_type() && w_up.scalar_type() == h.scalar_type() &&
                  shape.DP % 16 == 0 && shape.KP % 16 == 0 && shape.DP >= p.D && shape.KP >= p.K &&
                  w_up.size(0) == shape.DP && w_up.size(1) == shape.KP && w_down.is_contiguous() &&
                  w_up.is_contiguous(),
              "adapter_block_fwd: w_down/w_up must be padded to multiples of 16 and in h's dtype");
  TORCH_CHECK(p.D <= 2048, "the cuda backend supports hidden sizes up to 2048, got ", p.D);
  at::Tensor y = new_output(h);
  if (p.M == 0) return y;
  auto stream = c10::cuda::getCurrentCUDAStream();
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  AMPFUSE_DISPATCH(h.scalar_type(), "adapter_block_fwd", [&] {
    using T = typename Native<scalar_t>::type;
    // 32-row tiles while two blocks still fit on a multiprocessor, else 16.
    TileShape tile = shape;
    tile.BM = fwd_shared_bytes<T>(TileShape{32, shape.DP, shape.KP}) <= static_cast<size_t>(optin / 2) ? 32 : 16;
    const size_t shared = fwd_shared_bytes<T>(tile);
    TORCH_CHECK(shared <= static_cast<size_t>(optin), "adapter_block_fwd: d=", p.D, ", k=", p.K,
                " needs more shared memory than this GPU has; use the triton backend");
    auto launch = [&](auto kernel) {
      allow_shared(kernel, shared);
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, shared));
      kernel<<<grid_size((p.M + tile.BM - 1) / tile.BM, std::max(per_sm, 1)), kThreads, shared, stream>>>(
          p, tile, reinterpret_cast<const T*>(h.data_ptr<scalar_t>()), reinterpret_cast<const T*>(r.data_ptr<scalar_t>()),
          reinterpret_cast<const T*>(w_down.data_ptr<scalar_t>()), reinterpret_cast<const T*>(w_up.data_ptr<scalar_t>()),
          reinterpret_cast<T*>(y.data_ptr<scalar_t>()));
    };
    if (p.D <= 128) launch(adapter_block_fwd_kernel<T, 4>);
    else if (p.D <= 512) launch(adapter_block_fwd_kernel<T, 16>);
    else if (p.D <= 1024) launch(adapter_block_fwd_kernel<T, 32>);
    else launch(adapter_block_fwd_kernel<T, 64>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adapter_block_bwd(
    const at::Tensor& dy, const at::Tensor& h, const at::Tensor& r, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& w_down, const at::Tensor& b_down, const at::Tensor& w_up,
    const at::Tensor& b_up, const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& adapter_ln_weight,
    const c10::optional<at::Tensor>& adapter_ln_bias, double scale_value, double ln_eps, double adapter_ln_eps,
    int64_t activation, bool original_ln_before, bool residual_before_ln, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool ln_grad, bool input_grad, const std::vector<int64_t>& offsets,
    int64_t total) {
  TORCH_CHECK(offsets.size() == 9, "adapter_block_bwd: expected 9 gradient offsets");
  const c10::cuda::CUDAGuard guard(h.device());
  Params p = make_params(h, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight,
                         adapter_ln_bias, scale_value, ln_eps, adapter_ln_eps, activation, original_ln_before,
                         residual_before_ln, dropout_p, seed);
  const Offsets off{offsets[0], offsets[1], offsets[2], offsets[3], offsets[4],
                    offsets[5], offsets[6], offsets[7], offsets[8]};
  at::Tensor dh = input_grad ? new_output(h) : at::empty({0}, h.options());
  at::Tensor dr = input_grad ? new_output(r) : at::empty({0}, r.options());
  const int programs = std::max(1, grid_size(p.M, 2));
  at::Tensor part = new_output({programs, total}, h.options().dtype(at::kFloat));
  at::Tensor flat = new_output({total}, h.options().dtype(at::kFloat));
  const size_t shared = (5 * static_cast<size_t>(p.D) + 3 * p.K) * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AMPFUSE_DISPATCH(h.scalar_type(), "adapter_block_bwd", [&] {
    auto kernel = adapter_block_bwd_kernel<scalar_t>;
    allow_shared(kernel, shared);
    kernel<<<programs, kWarp, shared, stream>>>(
        p, off, total, ln_grad, input_grad, dy.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
        input_grad ? dh.data_ptr<scalar_t>() : nullptr, input_grad ? dr.data_ptr<scalar_t>() : nullptr,
        part.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int threads = 256;
  reduce_partials_kernel<<<static_cast<int>((total + threads - 1) / threads), threads, 0, stream>>>(
      part.data_ptr<float>(), flat.data_ptr<float>(), programs, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dh, dr, flat};
}

}  // namespace ampfuse
