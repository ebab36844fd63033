// Multi-scale deformable attention (Deformable-DETR, Zhu et al. 2021): kernel declarations
// and the bilinear-sampling geometry shared by the CPU and CUDA kernels.
//
// Shapes (B batch, S = sum_l H_l * W_l value tokens, H heads, C channels per head,
// Q queries, L levels, P points per level and head):
//   value               (B, S, H, C)          floating
//   spatial_shapes      (L, 2)   int64        (H_l, W_l) of every level
//   level_start_index   (L,)     int64        first token of every level in S
//   sampling_locations  (B, Q, H, L, P, 2)    (x, y), normalised so that [0, 1] spans the map
//   attention_weights   (B, Q, H, L, P)
//   output              (B, Q, H * C)
//
// A location (x, y) samples level l at pixel coordinates (x * W_l - 0.5, y * H_l - 0.5):
// pixel centres sit at half-integers, as in grid_sample(align_corners=False), and the
// four bilinear neighbours that fall outside the map contribute zero.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#if defined(__CUDACC__)
#define DI_MASKDINO_HOST_DEVICE __host__ __device__
#else
#define DI_MASKDINO_HOST_DEVICE
#endif

namespace di_maskdino {

// Problem sizes, read from value (B, S, H, C) and sampling_locations (B, Q, H, L, P, 2).
struct MsDeformAttnSizes {
  int64_t batch, tokens, heads, channels, queries, levels, points;

  MsDeformAttnSizes(const at::Tensor& value, const at::Tensor& sampling_locations)
      : batch(value.size(0)),
        tokens(value.size(1)),
        heads(value.size(2)),
        channels(value.size(3)),
        queries(sampling_locations.size(1)),
        levels(sampling_locations.size(3)),
        points(sampling_locations.size(4)) {}
};

// The four bilinear neighbours of one sampling location on one level.
// Corner k = 2 * dy + dx covers pixel (y0 + dy, x0 + dx).
template <typename scalar_t>
struct BilinearCorners {
  int64_t offset[4];       // row index (y * W + x) inside the level, valid where inside[k]
  bool inside[4];
  scalar_t weight[4];      // bilinear interpolation weight of each corner
  scalar_t d_weight_dx[4]; // derivative of weight[k] with respect to the pixel x coordinate
  scalar_t d_weight_dy[4]; // derivative of weight[k] with respect to the pixel y coordinate
  bool any_inside;

  DI_MASKDINO_HOST_DEVICE BilinearCorners(scalar_t loc_x, scalar_t loc_y, int64_t height,
                                          int64_t width) {
    const scalar_t x = loc_x * static_cast<scalar_t>(width) - static_cast<scalar_t>(0.5);
    const scalar_t y = loc_y * static_cast<scalar_t>(height) - static_cast<scalar_t>(0.5);
    // Outside (-1, W) x (-1, H) no neighbour is on the map; this also rejects NaN.
    any_inside = x > -1 && y > -1 && x < width && y < height;
    if (!any_inside) {
      for (int k = 0; k < 4; ++k) {
        inside[k] = false;
      }
      return;
    }
    const scalar_t x_floor = floor(x);
    const scalar_t y_floor = floor(y);
    const int64_t x0 = static_cast<int64_t>(x_floor);
    const int64_t y0 = static_cast<int64_t>(y_floor);
    const scalar_t fx = x - x_floor;  // distance to the left column
    const scalar_t fy = y - y_floor;  // distance to the top row
    const scalar_t wx[2] = {1 - fx, fx};
    const scalar_t wy[2] = {1 - fy, fy};
    const scalar_t d_linear[2] = {-1, 1};  // derivative of wx / wy with respect to x / y
    for (int dy = 0; dy < 2; ++dy) {
      for (int dx = 0; dx < 2; ++dx) {
        const int k = 2 * dy + dx;
        const int64_t xi = x0 + dx;
        const int64_t yi = y0 + dy;
        inside[k] = xi >= 0 && xi < width && yi >= 0 && yi < height;
        offset[k] = yi * width + xi;
        weight[k] = wy[dy] * wx[dx];
        d_weight_dx[k] = wy[dy] * d_linear[dx];
        d_weight_dy[k] = d_linear[dy] * wx[dx];
      }
    }
  }
};

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// Checks ranks, sizes, dtypes and devices; shared by every backend.
void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights);

}  // namespace di_maskdino
