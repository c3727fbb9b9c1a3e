// Registers the CUDA kernels as torch operators (namespace ampfuse_C) and makes the shared
// library importable as the Python module ampfuse._C. Only light headers: no torch/extension.h.

#include <Python.h>
#include <torch/library.h>

#include "adapter_block.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> adapter_block_bwd_op(
    const at::Tensor& dy, const at::Tensor& h, const at::Tensor& r, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& w_down, const at::Tensor& b_down, const at::Tensor& w_up,
    const at::Tensor& b_up, const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& adapter_ln_weight,
    const c10::optional<at::Tensor>& adapter_ln_bias, double scale_value, double ln_eps, double adapter_ln_eps,
    int64_t activation, bool original_ln_before, bool residual_before_ln, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool ln_grad, bool input_grad, c10::IntArrayRef offsets, int64_t total) {
  return ampfuse::adapter_block_bwd(dy, h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale,
                                    adapter_ln_weight, adapter_ln_bias, scale_value, ln_eps, adapter_ln_eps,
                                    activation, original_ln_before, residual_before_ln, dropout_p, seed, ln_grad,
                                    input_grad, offsets.vec(), total);
}

}  // namespace

TORCH_LIBRARY(ampfuse_C, m) {
  m.def("adapter_block_fwd", &ampfuse::adapter_block_fwd);
  m.def("adapter_block_bwd", &adapter_block_bwd_op);
  m.def("set_poison_outputs", &ampfuse::set_poison_outputs);
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "ampfuse CUDA kernels (torch.ops.ampfuse_C)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
