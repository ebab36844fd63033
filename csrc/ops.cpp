// Registers the operators of the di_maskdino._C extension with PyTorch's dispatcher:
//   torch.ops.di_maskdino.ms_deform_attn_forward
//   torch.ops.di_maskdino.ms_deform_attn_backward
// Autograd, the fake (meta) kernels and the autocast policy are registered from Python in
// di_maskdino/ops/ms_deform_attn.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace di_maskdino {

void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (B, S, heads, C), got ",
              value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(-1) == 2,
              "ms_deform_attn: sampling_locations must be (B, Q, heads, L, P, 2), got ",
              sampling_locations.sizes());
  const int64_t batch = value.size(0);
  const int64_t heads = value.size(2);
  const int64_t queries = sampling_locations.size(1);
  const int64_t levels = sampling_locations.size(3);
  const int64_t points = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(0) == batch && sampling_locations.size(2) == heads,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
              " does not match value ", value.sizes(), " in batch or heads");
  TORCH_CHECK(attention_weights.sizes() ==
                  at::IntArrayRef({batch, queries, heads, levels, points}),
              "ms_deform_attn: attention_weights must be (B, Q, heads, L, P) = (", batch, ", ",
              queries, ", ", heads, ", ", levels, ", ", points, "), got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == levels &&
                  spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2) with L = ", levels, ", got ",
              spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == levels,
              "ms_deform_attn: level_start_index must be (L,) with L = ", levels, ", got ",
              level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(value.scalar_type() == sampling_locations.scalar_type() &&
                  value.scalar_type() == attention_weights.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share one "
              "dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ",
              attention_weights.scalar_type());
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations,
                              &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(),
                "ms_deform_attn: all inputs must be on the device of value (", value.device(),
                "), found one on ", t->device());
  }
}

}  // namespace di_maskdino

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
