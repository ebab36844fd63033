// Argument checks shared by the CPU and CUDA entry points of multi-scale deformable
// attention (and by the host simulation of the CUDA entry points, csrc/host_sim/).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

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
  const auto value_type = value.scalar_type();
  TORCH_CHECK(value_type == at::kDouble || value_type == at::kFloat || value_type == at::kHalf ||
                  value_type == at::kBFloat16,
              "ms_deform_attn: value must be float64, float32, float16 or bfloat16, got ",
              value_type);
  const auto location_type = at::toOpMathType(value_type);
  TORCH_CHECK(sampling_locations.scalar_type() == location_type &&
                  attention_weights.scalar_type() == location_type,
              "ms_deform_attn: with a ", value_type,
              " value, sampling_locations and attention_weights must be ", location_type,
              " (the type the kernels accumulate in), got ", sampling_locations.scalar_type(),
              " and ", attention_weights.scalar_type(),
              "; di_maskdino.ops.ms_deform_attn converts them");
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations,
                              &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(),
                "ms_deform_attn: all inputs must be on the device of value (", value.device(),
                "), found one on ", t->device());
  }
}

void check_ms_deform_attn_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                                      const MsDeformAttnSizes& n) {
  TORCH_CHECK(grad_output.device() == value.device(),
              "ms_deform_attn backward: grad_output must be on the device of value (",
              value.device(), "), got ", grad_output.device());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn backward: grad_output must have the dtype of value (",
              value.scalar_type(), "), got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({n.batch, n.queries, n.heads * n.channels}),
              "ms_deform_attn backward: grad_output must have the shape of the output (B, Q, "
              "heads * C) = (",
              n.batch, ", ", n.queries, ", ", n.heads * n.channels, "), got ",
              grad_output.sizes());
}

void check_level_layout_on_host(const at::Tensor& spatial_shapes,
                                const at::Tensor& level_start_index, int64_t tokens) {
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const LevelLayoutCheck check = check_level_layout_values(
      shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), shapes.size(0), tokens);
  switch (check.problem) {
    case kLayoutOk:
      return;
    case kLayoutEmptyLevel:
      TORCH_CHECK(false, "ms_deform_attn: level ", check.level,
                  " has an empty spatial shape (",
                  shapes.data_ptr<int64_t>()[2 * check.level], ", ",
                  shapes.data_ptr<int64_t>()[2 * check.level + 1], ")");
    case kLayoutWrongStart:
      TORCH_CHECK(false, "ms_deform_attn: level_start_index[", check.level, "] is ",
                  check.actual, " but the spatial shapes of the levels before it add up to ",
                  check.expected);
    default:
      TORCH_CHECK(false, "ms_deform_attn: the levels hold ", check.expected,
                  " tokens (sum of H_l * W_l) but value has ", check.actual,
                  " (its dimension 1)");
  }
}

}  // namespace di_maskdino
