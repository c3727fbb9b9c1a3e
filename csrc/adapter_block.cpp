// Host side of the CUDA adapter block: argument checks, outputs, and the dispatch to the per-dtype
// launchers of csrc/adapter_block_kernels.h (the kernels are in adapter_block_kernels.cuh).

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <utility>

#include "adapter_block.h"
#include "adapter_block_kernels.h"

namespace ampfuse {

using namespace adapter_cuda;  // this file's alone: Params, the launchers, ...

namespace {

// fp32, fp16 and bf16 activations (the Python side rejects other dtypes before calling in).
#define AMPFUSE_DISPATCH(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                 \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename T> struct Native { using type = T; };
template <> struct Native<c10::Half> { using type = __half; };
template <> struct Native<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename scalar_t>
const typename Native<scalar_t>::type* native(const at::Tensor& t) {
  return reinterpret_cast<const typename Native<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

template <typename scalar_t>
typename Native<scalar_t>::type* native_out(at::Tensor& t) {
  return reinterpret_cast<typename Native<scalar_t>::type*>(t.data_ptr<scalar_t>());
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
  p.bd = b_down.data_ptr<float>();
  p.bu = b_up.data_ptr<float>();
  p.scale = fp32_ptr(scale);
  p.scale_mode = !scale ? AMPFUSE_SCALE_FLOAT : (scale->numel() > 1 ? AMPFUSE_SCALE_CHANNEL : AMPFUSE_SCALE_SCALAR);
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

Device current_device() {
  int device = 0, sms = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return {c10::cuda::getCurrentCUDAStream(), sms, optin};
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

// Checks the arguments both entry points share; returns the padded widths (DP, KP) of the weights.
std::pair<int, int> check_inputs(const char* op, const at::Tensor& h, const at::Tensor& r, const at::Tensor& w_down,
                                 const at::Tensor& w_up, const Params& p) {
  TORCH_CHECK(h.is_cuda() && h.dim() == 2 && h.is_contiguous(), op, ": h must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(r.sizes() == h.sizes() && r.scalar_type() == h.scalar_type() && r.is_contiguous(), op,
              ": r must match h in shape and dtype and be contiguous");
  const int DP = static_cast<int>(w_down.size(1)), KP = static_cast<int>(w_down.size(0));
  TORCH_CHECK(w_down.scalar_type() == h.scalar_type() && w_up.scalar_type() == h.scalar_type() && DP % 16 == 0 &&
                  KP % 16 == 0 && DP >= p.D && KP >= p.K && w_up.size(0) == DP && w_up.size(1) == KP &&
                  w_down.is_contiguous() && w_up.is_contiguous(),
              op, ": w_down/w_up must be padded to multiples of 16 and in h's dtype");
  TORCH_CHECK(p.D <= 2048, "the cuda backend supports hidden sizes up to 2048, got ", p.D);
  return {DP, KP};
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
  const c10::cuda::CUDAGuard guard(h.device());
  Params p = make_params(h, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight,
                         adapter_ln_bias, scale_value, ln_eps, adapter_ln_eps, activation, original_ln_before,
                         residual_before_ln, dropout_p, seed);
  const auto [DP, KP] = check_inputs("adapter_block_fwd", h, r, w_down, w_up, p);
  at::Tensor y = new_output(h);
  if (p.M == 0) return y;
  const Device device = current_device();
  const int optin = device.max_shared;
  AMPFUSE_DISPATCH(h.scalar_type(), "adapter_block_fwd", [&] {
    using T = typename Native<scalar_t>::type;
    // 32-row tiles while two blocks still fit on a multiprocessor, else 16.
    const TileShape tile{fwd_shared_bytes<T>(TileShape{32, DP, KP}) <= static_cast<size_t>(optin / 2) ? 32 : 16, DP,
                         KP};
    const size_t shared = fwd_shared_bytes<T>(tile);
    TORCH_CHECK(shared <= static_cast<size_t>(optin), "adapter_block_fwd: d=", p.D, ", k=", p.K,
                " needs more shared memory than this GPU has; use the triton backend");
    const FwdArgs<T> args{p, tile, native<scalar_t>(h), native<scalar_t>(r), native<scalar_t>(w_down),
                          native<scalar_t>(w_up), native_out<scalar_t>(y)};
    C10_CUDA_CHECK(launch_fwd<T>(args, shared, device));
  });
  return y;
}

// w_down, w_up: padded and in h's dtype, as for the forward. Returns (dh, dr, flat): flat holds the
// parameter gradients in fp32 at `offsets` (order of ops/cuda.py's GRADIENT_ORDER), total floats.
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
  const auto [DP, KP] = check_inputs("adapter_block_bwd", h, r, w_down, w_up, p);
  TORCH_CHECK(dy.sizes() == h.sizes() && dy.scalar_type() == h.scalar_type() && dy.is_contiguous(),
              "adapter_block_bwd: dy must match h in shape and dtype and be contiguous");
  const Offsets off{offsets[0], offsets[1], offsets[2], offsets[3], offsets[4],
                    offsets[5], offsets[6], offsets[7], offsets[8]};
  TORCH_CHECK(off.w_up >= 0 && off.w_down >= 0 && off.b_up >= 0 && off.b_down >= 0,
              "adapter_block_bwd: the weight and bias gradients need offsets");
  at::Tensor dh = input_grad ? new_output(h) : at::empty({0}, h.options());
  at::Tensor dr = input_grad ? new_output(r) : at::empty({0}, r.options());
  at::Tensor flat = new_output({total}, h.options().dtype(at::kFloat));
  if (p.M == 0) return {dh, dr, flat.zero_()};
  Slice sl{};
  sl.wu = (total + 7) / 8 * 8;  // 32-byte aligned, as WMMA accesses need
  sl.wd = sl.wu + static_cast<int64_t>(DP) * KP;
  sl.width = sl.wd + static_cast<int64_t>(KP) * DP;
  const Device device = current_device();
  const int optin = device.max_shared;
  AMPFUSE_DISPATCH(h.scalar_type(), "adapter_block_bwd", [&] {
    using T = typename Native<scalar_t>::type;
    const size_t shared = bwd_shared_bytes<T>(DP, KP);
    TORCH_CHECK(shared <= static_cast<size_t>(optin), "adapter_block_bwd: d=", p.D, ", k=", p.K, " in ",
                h.scalar_type(), " needs ", shared / 1024, " KiB of shared memory, more than this GPU has; use the "
                "triton backend");
    constexpr int kTop = top_cpt<T>();
    TORCH_CHECK(DP <= kTop * kThreads, "adapter_block_bwd: d=", p.D, " in ", h.scalar_type(),
                " is wider than the cuda backward supports (", kTop * kThreads, "); use the triton backend");
    const BwdArgs<T> args{p, DP, KP, off, sl, ln_grad, input_grad, native<scalar_t>(dy), native<scalar_t>(h),
                          native<scalar_t>(r), native<scalar_t>(w_down), native<scalar_t>(w_up),
                          input_grad ? native_out<scalar_t>(dh) : nullptr,
                          input_grad ? native_out<scalar_t>(dr) : nullptr};
    int programs = 0;
    C10_CUDA_CHECK(bwd_programs<T>(args, shared, device, &programs));
    at::Tensor part = new_output({programs, sl.width}, h.options().dtype(at::kFloat));
    C10_CUDA_CHECK(launch_bwd<T>(args, shared, device, programs, part.data_ptr<float>(), flat.data_ptr<float>(), total));
  });
  return {dh, dr, flat};
}

}  // namespace ampfuse
