// CPU kernels of multi-scale deformable attention; shapes and sampling rule in
// ms_deform_attn.h.
//
// Forward: work is split over (batch, query) pairs; every pair owns its output row.
// Backward: work is split over (batch, head) pairs. The value gradient of pair (b, h) is the
// slice grad_value[b, :, h, :], and the location / weight gradients of its samples are
// touched by no other pair, so threads never write to the same memory (no atomics, no
// per-thread buffers). The price is parallelism capped at B * H work items.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../ms_deform_attn.h"

namespace di_maskdino {
namespace {

using Sizes = MsDeformAttnSizes;

// The CPU kernels index the value tensor with these numbers, so they must be consistent.
void check_level_layout(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        int64_t tokens) {
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  int64_t expected_start = 0;
  for (int64_t l = 0; l < spatial_shapes.size(0); ++l) {
    TORCH_CHECK(shapes[2 * l] > 0 && shapes[2 * l + 1] > 0, "ms_deform_attn: level ", l,
                " has an empty spatial shape (", shapes[2 * l], ", ", shapes[2 * l + 1], ")");
    TORCH_CHECK(starts[l] == expected_start, "ms_deform_attn: level_start_index[", l, "] is ",
                starts[l], " but the spatial shapes of the levels before it add up to ",
                expected_start);
    expected_start += shapes[2 * l] * shapes[2 * l + 1];
  }
  TORCH_CHECK(expected_start == tokens, "ms_deform_attn: the levels hold ", expected_start,
              " tokens (sum of H_l * W_l) but value has ", tokens, " (its dimension 1)");
}

template <typename scalar_t>
void forward_kernel(const Sizes& n, const scalar_t* value, const int64_t* shapes,
                    const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                    scalar_t* output) {
  const int64_t row_stride = n.heads * n.channels;  // distance between two value tokens
  at::parallel_for(0, n.batch * n.queries, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bq = begin; bq < end; ++bq) {
      const scalar_t* value_b = value + (bq / n.queries) * n.tokens * row_stride;
      for (int64_t h = 0; h < n.heads; ++h) {
        const int64_t bqh = bq * n.heads + h;
        scalar_t* out = output + bqh * n.channels;
        for (int64_t l = 0; l < n.levels; ++l) {
          const scalar_t* value_l = value_b + starts[l] * row_stride + h * n.channels;
          for (int64_t p = 0; p < n.points; ++p) {
            const int64_t sample = (bqh * n.levels + l) * n.points + p;
            const BilinearCorners<scalar_t> corners(locations[2 * sample],
                                                    locations[2 * sample + 1], shapes[2 * l],
                                                    shapes[2 * l + 1]);
            if (!corners.any_inside) {
              continue;
            }
            const scalar_t attention = weights[sample];
            for (int k = 0; k < 4; ++k) {
              if (!corners.inside[k]) {
                continue;
              }
              const scalar_t scale = attention * corners.weight[k];
              const scalar_t* v = value_l + corners.offset[k] * row_stride;
              for (int64_t c = 0; c < n.channels; ++c) {
                out[c] += scale * v[c];
              }
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Sizes& n, const scalar_t* grad_output, const scalar_t* value,
                     const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                     const scalar_t* weights, scalar_t* grad_value, scalar_t* grad_locations,
                     scalar_t* grad_weights) {
  const int64_t row_stride = n.heads * n.channels;
  at::parallel_for(0, n.batch * n.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / n.heads;
      const int64_t h = bh % n.heads;
      const int64_t value_b = b * n.tokens * row_stride + h * n.channels;
      for (int64_t q = 0; q < n.queries; ++q) {
        const int64_t bqh = (b * n.queries + q) * n.heads + h;
        const scalar_t* g = grad_output + bqh * n.channels;
        for (int64_t l = 0; l < n.levels; ++l) {
          const int64_t height = shapes[2 * l];
          const int64_t width = shapes[2 * l + 1];
          const scalar_t* value_l = value + value_b + starts[l] * row_stride;
          scalar_t* grad_value_l = grad_value + value_b + starts[l] * row_stride;
          for (int64_t p = 0; p < n.points; ++p) {
            const int64_t sample = (bqh * n.levels + l) * n.points + p;
            const BilinearCorners<scalar_t> corners(locations[2 * sample],
                                                    locations[2 * sample + 1], height, width);
            if (!corners.any_inside) {
              continue;  // gradients stay zero
            }
            const scalar_t attention = weights[sample];
            scalar_t d_attention = 0;  // d out / d attention = sampled value . g
            scalar_t d_x = 0;          // d out / d x, before the attention factor
            scalar_t d_y = 0;
            for (int k = 0; k < 4; ++k) {
              if (!corners.inside[k]) {
                continue;
              }
              const int64_t row = corners.offset[k] * row_stride;
              const scalar_t* v = value_l + row;
              scalar_t* gv = grad_value_l + row;
              const scalar_t scale = attention * corners.weight[k];
              scalar_t dot = 0;
              for (int64_t c = 0; c < n.channels; ++c) {
                dot += g[c] * v[c];
                gv[c] += scale * g[c];
              }
              d_attention += corners.weight[k] * dot;
              d_x += corners.d_weight_dx[k] * dot;
              d_y += corners.d_weight_dy[k] * dot;
            }
            grad_weights[sample] = d_attention;
            // x_pixel = x * W - 0.5, so d x_pixel / d x = W (and H for y).
            grad_locations[2 * sample] = attention * d_x * static_cast<scalar_t>(width);
            grad_locations[2 * sample + 1] = attention * d_y * static_cast<scalar_t>(height);
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto locations_c = sampling_locations.contiguous();
  const auto weights_c = attention_weights.contiguous();
  const Sizes n(value_c, locations_c);
  check_level_layout(shapes_c, starts_c, n.tokens);

  auto output = at::zeros({n.batch, n.queries, n.heads * n.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(n, value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(),
                             starts_c.data_ptr<int64_t>(), locations_c.data_ptr<scalar_t>(),
                             weights_c.data_ptr<scalar_t>(), output.data_ptr<scalar_t>());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto locations_c = sampling_locations.contiguous();
  const auto weights_c = attention_weights.contiguous();
  const auto grad_c = grad_output.contiguous();
  const Sizes n(value_c, locations_c);
  check_level_layout(shapes_c, starts_c, n.tokens);
  TORCH_CHECK(grad_c.numel() == n.batch * n.queries * n.heads * n.channels &&
                  grad_c.scalar_type() == value.scalar_type(),
              "ms_deform_attn backward: grad_output must match the forward output");

  auto grad_value = at::zeros_like(value_c);
  auto grad_locations = at::zeros_like(locations_c);
  auto grad_weights = at::zeros_like(weights_c);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(n, grad_c.data_ptr<scalar_t>(), value_c.data_ptr<scalar_t>(),
                              shapes_c.data_ptr<int64_t>(), starts_c.data_ptr<int64_t>(),
                              locations_c.data_ptr<scalar_t>(), weights_c.data_ptr<scalar_t>(),
                              grad_value.data_ptr<scalar_t>(),
                              grad_locations.data_ptr<scalar_t>(),
                              grad_weights.data_ptr<scalar_t>());
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace di_maskdino
