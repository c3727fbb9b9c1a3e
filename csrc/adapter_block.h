#pragma once
// Host entry points of the CUDA adapter block (csrc/adapter_block.cpp), registered in bindings.cpp.

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

namespace ampfuse {

at::Tensor adapter_block_fwd(const at::Tensor& h, const at::Tensor& r, const at::Tensor& ln_weight,
                             const at::Tensor& ln_bias, const at::Tensor& w_down, const at::Tensor& b_down,
                             const at::Tensor& w_up, const at::Tensor& b_up, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& adapter_ln_weight,
                             const c10::optional<at::Tensor>& adapter_ln_bias, double scale_value, double ln_eps,
                             double adapter_ln_eps, int64_t activation, bool original_ln_before,
                             bool residual_before_ln, double dropout_p, const c10::optional<at::Tensor>& seed);

// Tests only: fill every output with NaN before the kernels run (see kernels.runtime.POISON_OUTPUTS).
void set_poison_outputs(bool on);

std::tuple<at::Tensor, at::Tensor, at::Tensor> adapter_block_bwd(
    const at::Tensor& dy, const at::Tensor& h, const at::Tensor& r, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& w_down, const at::Tensor& b_down, const at::Tensor& w_up,
    const at::Tensor& b_up, const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& adapter_ln_weight,
    const c10::optional<at::Tensor>& adapter_ln_bias, double scale_value, double ln_eps, double adapter_ln_eps,
    int64_t activation, bool original_ln_before, bool residual_before_ln, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool ln_grad, bool input_grad, const std::vector<int64_t>& offsets,
    int64_t total);

}  // namespace ampfuse
