// Multi-scale deformable attention (Deformable-DETR, Zhu et al. 2021): kernel declarations
// and the pieces shared by the CPU and CUDA kernels (bilinear-sampling geometry, level-layout
// check). This header compiles under nvcc, under the host C++ compiler, and under the host
// simulation of the CUDA kernels (csrc/host_sim/).
//
// Shapes (B batch, S = sum_l H_l * W_l value tokens, H heads, C channels per head,
// Q queries, L levels, P points per level and head):
//   value               (B, S, H, C)          float64, float32, float16 or bfloat16
//   spatial_shapes      (L, 2)   int64        (H_l, W_l) of every level
//   level_start_index   (L,)     int64        first token of every level in S
//   sampling_locations  (B, Q, H, L, P, 2)    (x, y), normalised so that [0, 1] spans the map
//   attention_weights   (B, Q, H, L, P)
//   output              (B, Q, H * C)         dtype of value
// sampling_locations and attention_weights are in the accumulation type of value
// (at::opmath_type: float64 for float64 values, float32 otherwise), and so are their
// gradients: a float16 location cannot resolve a pixel of a 200-pixel-wide level.
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

// The four bilinear neighbours of one sampling location on one level, in the accumulation
// type acc_t. Corner k = 2 * dy + dx covers pixel (y0 + dy, x0 + dx).
template <typename acc_t>
struct BilinearCorners {
  int64_t offset[4];     // row index (y * W + x) inside the level, valid where inside[k]
  bool inside[4];
  acc_t weight[4];       // bilinear interpolation weight of each corner
  acc_t d_weight_dx[4];  // derivative of weight[k] with respect to the pixel x coordinate
  acc_t d_weight_dy[4];  // derivative of weight[k] with respect to the pixel y coordinate
  int64_t y0;            // row of corners 0 and 1 (corners 2 and 3 are on row y0 + 1)
  bool any_inside;

  DI_MASKDINO_HOST_DEVICE BilinearCorners(acc_t loc_x, acc_t loc_y, int64_t height,
                                          int64_t width) {
    const acc_t x = loc_x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
    const acc_t y = loc_y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
    // Outside (-1, W) x (-1, H) no neighbour is on the map; this also rejects NaN.
    any_inside = x > -1 && y > -1 && x < width && y < height;
    y0 = -2;
    if (!any_inside) {
      for (int k = 0; k < 4; ++k) {
        inside[k] = false;
        offset[k] = 0;
        weight[k] = d_weight_dx[k] = d_weight_dy[k] = 0;
      }
      return;
    }
    const acc_t x_floor = floor(x);
    const acc_t y_floor = floor(y);
    const int64_t x0 = static_cast<int64_t>(x_floor);
    y0 = static_cast<int64_t>(y_floor);
    const acc_t fx = x - x_floor;  // distance to the left column
    const acc_t fy = y - y_floor;  // distance to the top row
    const acc_t wx[2] = {1 - fx, fx};
    const acc_t wy[2] = {1 - fy, fy};
    const acc_t d_linear[2] = {-1, 1};  // derivative of wx / wy with respect to x / y
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

// The kernels index value with spatial_shapes and level_start_index, so these must describe
// S exactly: every level non-empty, each starting where the previous one ends, S in total.
// One definition for both devices: the CPU entry points run it on the host, the CUDA ones in
// a one-thread kernel (reading the tensors on the host would cost a synchronisation).
enum LevelLayoutProblem : int {
  kLayoutOk = 0,
  kLayoutEmptyLevel = 1,  // H_l <= 0 or W_l <= 0
  kLayoutWrongStart = 2,  // level_start_index[l] != sum of the sizes of the levels before l
  kLayoutWrongTotal = 3,  // sum of H_l * W_l != S
};

struct LevelLayoutCheck {
  int problem;
  int64_t level;     // the level at fault (kLayoutEmptyLevel, kLayoutWrongStart)
  int64_t expected;  // the start or total the shapes imply
  int64_t actual;    // the start given, or S
};

DI_MASKDINO_HOST_DEVICE inline LevelLayoutCheck check_level_layout_values(
    const int64_t* shapes, const int64_t* starts, int64_t levels, int64_t tokens) {
  int64_t expected_start = 0;
  for (int64_t l = 0; l < levels; ++l) {
    if (shapes[2 * l] <= 0 || shapes[2 * l + 1] <= 0) {
      return {kLayoutEmptyLevel, l, 0, 0};
    }
    if (starts[l] != expected_start) {
      return {kLayoutWrongStart, l, expected_start, starts[l]};
    }
    expected_start += shapes[2 * l] * shapes[2 * l + 1];
  }
  if (expected_start != tokens) {
    return {kLayoutWrongTotal, -1, expected_start, tokens};
  }
  return {kLayoutOk, -1, 0, 0};
}

// ---- checks shared by the entry points of every device (csrc/checks.cpp) ----

// Ranks, sizes, dtypes and devices of the forward's inputs.
void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights);

// grad_output of the backward: (B, Q, H * C), on value's device, in value's dtype.
void check_ms_deform_attn_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                                      const MsDeformAttnSizes& sizes);

// check_level_layout_values on CPU tensors, with a message naming the fault.
void check_level_layout_on_host(const at::Tensor& spatial_shapes,
                                const at::Tensor& level_start_index, int64_t tokens);

// ---- entry points ----

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

}  // namespace di_maskdino
