// Registers the operators of the di_maskdino._C extension with PyTorch's dispatcher:
//   torch.ops.di_maskdino.ms_deform_attn_forward
//   torch.ops.di_maskdino.ms_deform_attn_backward
// The CPU kernels are registered here, the CUDA ones in cuda/ms_deform_attn_cuda.cu.
// Autograd and the fake (meta) kernels are registered from Python in
// di_maskdino/ops/ms_deform_attn.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

TORCH_LIBRARY(di_maskdino, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(di_maskdino, CPU, m) {
  m.impl("ms_deform_attn_forward", &di_maskdino::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &di_maskdino::ms_deform_attn_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled operators of di_maskdino (registered under torch.ops.di_maskdino)";
  m.def(
      "compiled_with_cuda",
      []() {
#ifdef WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels were compiled into this build");
}
