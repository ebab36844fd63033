// Device code of the CUDA kernels of multi-scale deformable attention (shapes, dtypes and
// sampling rule in ../ms_deform_attn.h). nvcc compiles it in ms_deform_attn_cuda.cu; the
// tests compile the same text for the host under the simulation of
// ../host_sim/cuda_host_sim.h and compare with the float64 reference (tests/ops/).
//
// It uses threadIdx / blockIdx / blockDim / gridDim (.x), __shfl_xor_sync, atomicAdd on
// float and double, and DI_DEVICE_CHECK (a device-side assert); no shared memory and no
// __syncthreads. Keep it to these, or teach the simulation the new primitive first.
//
// Lane groups. The kernels split every warp into groups of `group` lanes (a power of two
// dividing 32). A group handles one query-head (b, q, h) at a time: lane r of the group
// handles channels [c0, c0 + V) for c0 = r V, r V + group V, ... < C, V channels loaded
// in one 16-byte access where C and the alignment allow (V = 4 float32, 2 float64, 8 half
// types; otherwise 1). For C = 32 in float32 a group is 8 lanes, so the four groups of a
// warp read four whole 128-byte value rows, and the backward's atomic additions of one
// corner of one query-head fall in one 128-byte line.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../ms_deform_attn.h"

#ifndef DI_DEVICE_CHECK
// A failed check stops the kernel like CUDA_KERNEL_ASSERT: the message is printed on the
// device and the next synchronisation raises "device-side assert triggered".
#define DI_DEVICE_CHECK(cond, message) CUDA_KERNEL_ASSERT((cond) && message)
#endif

namespace di_maskdino {
namespace cuda_kernels {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Row key of a (sample, corner) pair that lands outside the map (sorted after all others).
constexpr int64_t kNoRow = INT64_MAX;

template <typename T, int V>
struct alignas(sizeof(T) * V) Channels {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Channels<T, V> load_channels(const T* p) {
  return *reinterpret_cast<const Channels<T, V>*>(p);
}

// One thread checks spatial_shapes / level_start_index against S with the same function as
// the CPU entry points; the sampling kernels launched after it on the stream index value
// with them only if it passed.
__global__ void check_level_layout_kernel(const int64_t* shapes, const int64_t* starts,
                                          int64_t levels, int64_t tokens) {
  if (blockIdx.x != 0 || threadIdx.x != 0) {
    return;
  }
  const LevelLayoutCheck check = check_level_layout_values(shapes, starts, levels, tokens);
  DI_DEVICE_CHECK(check.problem != kLayoutEmptyLevel,
                  "ms_deform_attn: spatial_shapes has an empty level (H_l or W_l <= 0)");
  DI_DEVICE_CHECK(check.problem != kLayoutWrongStart,
                  "ms_deform_attn: level_start_index does not match the sizes in spatial_shapes");
  DI_DEVICE_CHECK(check.problem != kLayoutWrongTotal,
                  "ms_deform_attn: the levels of spatial_shapes do not add up to value.size(1)");
}

// Forward: a group per query-head, grid-stride over query-heads. kLevels / kPoints > 0 fix
// L and P at compile time (the model's 4 x 4), so the sample loops unroll.
template <typename scalar_t, int V, int kLevels, int kPoints>
__global__ void forward_kernel(const MsDeformAttnSizes n, const int group,
                               const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const at::opmath_type<scalar_t>* __restrict__ locations,
                               const at::opmath_type<scalar_t>* __restrict__ weights,
                               scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t levels = kLevels > 0 ? kLevels : n.levels;
  const int64_t points = kPoints > 0 ? kPoints : n.points;
  const int64_t row_stride = n.heads * n.channels;
  const int64_t lane = threadIdx.x % group;
  const int64_t groups_per_block = blockDim.x / group;
  const int64_t query_heads = n.batch * n.queries * n.heads;
  for (int64_t bqh = blockIdx.x * groups_per_block + threadIdx.x / group; bqh < query_heads;
       bqh += gridDim.x * groups_per_block) {
    const int64_t h = bqh % n.heads;
    const int64_t b = bqh / (n.heads * n.queries);
    const scalar_t* value_bh = value + b * n.tokens * row_stride + h * n.channels;
    for (int64_t c0 = lane * V; c0 < n.channels; c0 += group * V) {
      acc_t acc[V];
      for (int j = 0; j < V; ++j) {
        acc[j] = 0;
      }
      for (int64_t l = 0; l < levels; ++l) {
        const int64_t height = shapes[2 * l];
        const int64_t width = shapes[2 * l + 1];
        const scalar_t* value_l = value_bh + starts[l] * row_stride + c0;
        for (int64_t p = 0; p < points; ++p) {
          const int64_t sample = (bqh * levels + l) * points + p;
          const BilinearCorners<acc_t> corners(locations[2 * sample], locations[2 * sample + 1],
                                               height, width);
          if (!corners.any_inside) {
            continue;
          }
          const acc_t attention = weights[sample];
          for (int k = 0; k < 4; ++k) {
            if (!corners.inside[k]) {
              continue;
            }
            const acc_t scale = attention * corners.weight[k];
            const Channels<scalar_t, V> v = load_channels<V>(value_l + corners.offset[k] * row_stride);
            for (int j = 0; j < V; ++j) {
              acc[j] += scale * static_cast<acc_t>(v.v[j]);
            }
          }
        }
      }
      Channels<scalar_t, V> out;
      for (int j = 0; j < V; ++j) {
        out.v[j] = static_cast<scalar_t>(acc[j]);
      }
      *reinterpret_cast<Channels<scalar_t, V>*>(output + bqh * n.channels + c0) = out;
    }
  }
}

// Backward: a group per query-head. For every sample each lane computes its channels' share
// of g . v for the four corners and, unless grad_value is null, adds attention * weight * g
// to the corners' value-gradient rows atomically (the group's lanes cover adjacent channels of
// one row). The shares are then summed over the group's lanes with a butterfly of
// __shfl_xor_sync and lane 0 writes the sample's location and weight gradients, which no
// other thread touches. Every lane of a warp runs the loops the same number of times (a group
// past the last query-head computes zeros), as the full-mask shuffles require.
template <typename scalar_t, int V, int kLevels, int kPoints>
__global__ void backward_kernel(const MsDeformAttnSizes n, const int group,
                                const scalar_t* __restrict__ grad_output,
                                const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const at::opmath_type<scalar_t>* __restrict__ locations,
                                const at::opmath_type<scalar_t>* __restrict__ weights,
                                at::opmath_type<scalar_t>* __restrict__ grad_value,
                                at::opmath_type<scalar_t>* __restrict__ grad_locations,
                                at::opmath_type<scalar_t>* __restrict__ grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t levels = kLevels > 0 ? kLevels : n.levels;
  const int64_t points = kPoints > 0 ? kPoints : n.points;
  const int64_t row_stride = n.heads * n.channels;
  const int64_t lane = threadIdx.x % group;
  const int64_t groups_per_warp = kWarpSize / group;
  const int64_t group_in_warp = (threadIdx.x % kWarpSize) / group;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpSize;
  const int64_t warps = gridDim.x * static_cast<int64_t>(blockDim.x) / kWarpSize;
  const int64_t query_heads = n.batch * n.queries * n.heads;
  for (int64_t first = warp * groups_per_warp; first < query_heads;
       first += warps * groups_per_warp) {
    const int64_t bqh = first + group_in_warp;
    const bool active = bqh < query_heads;
    const int64_t h = bqh % n.heads;
    const int64_t b = bqh / (n.heads * n.queries);
    const int64_t row_bh = b * n.tokens * row_stride + h * n.channels;
    const scalar_t* g_row = grad_output + bqh * n.channels;
    for (int64_t l = 0; l < levels; ++l) {
      const int64_t height = shapes[2 * l];
      const int64_t width = shapes[2 * l + 1];
      const int64_t row_l = row_bh + starts[l] * row_stride;
      for (int64_t p = 0; p < points; ++p) {
        const int64_t sample = (bqh * levels + l) * points + p;
        // An inactive group samples at (-2, -2), off every map: no corner, zero shares.
        const BilinearCorners<acc_t> corners(active ? locations[2 * sample] : acc_t(-2),
                                             active ? locations[2 * sample + 1] : acc_t(-2),
                                             height, width);
        const acc_t attention = corners.any_inside ? weights[sample] : acc_t(0);
        acc_t d_attention = 0;  // d out / d attention = sampled value . g
        acc_t d_x = 0;          // d out / d x_pixel, before the attention factor
        acc_t d_y = 0;
        if (corners.any_inside) {
          for (int64_t c0 = lane * V; c0 < n.channels; c0 += group * V) {
            const Channels<scalar_t, V> g = load_channels<V>(g_row + c0);
            for (int k = 0; k < 4; ++k) {
              if (!corners.inside[k]) {
                continue;
              }
              const int64_t row = row_l + corners.offset[k] * row_stride + c0;
              const Channels<scalar_t, V> v = load_channels<V>(value + row);
              acc_t g_dot_v = 0;
              for (int j = 0; j < V; ++j) {
                g_dot_v += static_cast<acc_t>(g.v[j]) * static_cast<acc_t>(v.v[j]);
              }
              d_attention += corners.weight[k] * g_dot_v;
              d_x += corners.d_weight_dx[k] * g_dot_v;
              d_y += corners.d_weight_dy[k] * g_dot_v;
              if (grad_value != nullptr) {
                const acc_t scale = attention * corners.weight[k];
                for (int j = 0; j < V; ++j) {
                  atomicAdd(grad_value + row + j, scale * static_cast<acc_t>(g.v[j]));
                }
              }
            }
          }
        }
        for (int offset = group / 2; offset > 0; offset /= 2) {
          d_attention += __shfl_xor_sync(kFullMask, d_attention, offset);
          d_x += __shfl_xor_sync(kFullMask, d_x, offset);
          d_y += __shfl_xor_sync(kFullMask, d_y, offset);
        }
        if (corners.any_inside && lane == 0) {
          grad_weights[sample] = d_attention;
          // x_pixel = x * W - 0.5, so d x_pixel / d x = W (and H for y).
          grad_locations[2 * sample] = attention * d_x * static_cast<acc_t>(width);
          grad_locations[2 * sample + 1] = attention * d_y * static_cast<acc_t>(height);
        }
      }
    }
  }
}

// ---- deterministic value gradient (torch.use_deterministic_algorithms(True)) ----
// Without atomics: every (sample, corner) pair gets the key of the value row (b, s, h) it
// lands on, the pairs are sorted by key (stably, so ties keep the pair order), and the first
// pair of each run of equal keys sums the run in that order into its row.

// One thread per pair i = 4 * sample + corner: its row key (or kNoRow) and its factor
// attention * bilinear weight.
template <typename acc_t>
__global__ void corner_rows_kernel(const MsDeformAttnSizes n, const int64_t* __restrict__ shapes,
                                   const int64_t* __restrict__ starts,
                                   const acc_t* __restrict__ locations,
                                   const acc_t* __restrict__ weights, int64_t* __restrict__ rows,
                                   acc_t* __restrict__ scales) {
  const int64_t pairs = 4 * n.batch * n.queries * n.heads * n.levels * n.points;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < pairs;
       i += gridDim.x * static_cast<int64_t>(blockDim.x)) {
    const int64_t sample = i / 4;
    const int k = static_cast<int>(i % 4);
    const int64_t l = (sample / n.points) % n.levels;
    const int64_t bqh = sample / (n.points * n.levels);
    const int64_t h = bqh % n.heads;
    const int64_t b = bqh / (n.heads * n.queries);
    const BilinearCorners<acc_t> corners(locations[2 * sample], locations[2 * sample + 1],
                                         shapes[2 * l], shapes[2 * l + 1]);
    if (corners.inside[k]) {
      rows[i] = (b * n.tokens + starts[l] + corners.offset[k]) * n.heads + h;
      scales[i] = weights[sample] * corners.weight[k];
    } else {
      rows[i] = kNoRow;
      scales[i] = 0;
    }
  }
}

// A group per position j of the sorted pairs; the group at the first position of a run
// writes that value row, the others have nothing to do.
template <typename scalar_t, int V>
__global__ void value_grad_from_sorted_kernel(
    const MsDeformAttnSizes n, const int group, const int64_t pairs,
    const int64_t* __restrict__ sorted_rows, const int64_t* __restrict__ order,
    const at::opmath_type<scalar_t>* __restrict__ scales,
    const scalar_t* __restrict__ grad_output, scalar_t* __restrict__ grad_value) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t lane = threadIdx.x % group;
  const int64_t groups_per_block = blockDim.x / group;
  const int64_t samples_per_query_head = n.levels * n.points;
  for (int64_t j = blockIdx.x * groups_per_block + threadIdx.x / group; j < pairs;
       j += gridDim.x * groups_per_block) {
    const int64_t row = sorted_rows[j];
    if (row == kNoRow || (j > 0 && sorted_rows[j - 1] == row)) {
      continue;
    }
    for (int64_t c0 = lane * V; c0 < n.channels; c0 += group * V) {
      acc_t acc[V];
      for (int i = 0; i < V; ++i) {
        acc[i] = 0;
      }
      for (int64_t m = j; m < pairs && sorted_rows[m] == row; ++m) {
        const int64_t pair = order[m];
        const int64_t bqh = pair / 4 / samples_per_query_head;
        const acc_t scale = scales[pair];
        const Channels<scalar_t, V> g = load_channels<V>(grad_output + bqh * n.channels + c0);
        for (int i = 0; i < V; ++i) {
          acc[i] += scale * static_cast<acc_t>(g.v[i]);
        }
      }
      Channels<scalar_t, V> out;
      for (int i = 0; i < V; ++i) {
        out.v[i] = static_cast<scalar_t>(acc[i]);
      }
      *reinterpret_cast<Channels<scalar_t, V>*>(grad_value + row * n.channels + c0) = out;
    }
  }
}

}  // namespace cuda_kernels
}  // namespace di_maskdino
