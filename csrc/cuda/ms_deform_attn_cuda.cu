// CUDA kernels of multi-scale deformable attention; shapes and sampling rule in
// ms_deform_attn.h (the same BilinearCorners as the CPU kernels).
//
// Forward: one thread per output element (b, q, h, c). Neighbouring threads read
// neighbouring channels of the same value row, so loads coalesce.
// Backward: one thread per sample (b, q, h, l, p). The thread owns the gradients of its
// sample's location and attention weight (no reduction across threads is needed); value
// gradients of different samples can hit the same row and are accumulated atomically.
//
// Unlike the CPU path, the level layout (spatial_shapes / level_start_index against S) is
// not checked here: reading it would cost a device-to-host copy and a sync on every call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../ms_deform_attn.h"

namespace di_maskdino {
namespace {

using Sizes = MsDeformAttnSizes;
constexpr int kThreads = 256;

int64_t num_blocks(int64_t work) {
  // Grid-stride loops cover whatever a capped grid does not.
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 65535 * 16));
}

template <typename scalar_t>
__global__ void forward_kernel(const Sizes n, const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const scalar_t* __restrict__ locations,
                               const scalar_t* __restrict__ weights,
                               scalar_t* __restrict__ output) {
  const int64_t row_stride = n.heads * n.channels;
  const int64_t total = n.batch * n.queries * row_stride;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t c = i % n.channels;
    const int64_t bqh = i / n.channels;
    const int64_t h = bqh % n.heads;
    const int64_t b = bqh / (n.heads * n.queries);
    const scalar_t* value_bhc = value + b * n.tokens * row_stride + h * n.channels + c;
    scalar_t acc = 0;
    for (int64_t l = 0; l < n.levels; ++l) {
      const scalar_t* value_l = value_bhc + starts[l] * row_stride;
      for (int64_t p = 0; p < n.points; ++p) {
        const int64_t sample = (bqh * n.levels + l) * n.points + p;
        const BilinearCorners<scalar_t> corners(locations[2 * sample], locations[2 * sample + 1],
                                                shapes[2 * l], shapes[2 * l + 1]);
        if (!corners.any_inside) {
          continue;
        }
        scalar_t sampled = 0;
        for (int k = 0; k < 4; ++k) {
          if (corners.inside[k]) {
            sampled += corners.weight[k] * value_l[corners.offset[k] * row_stride];
          }
        }
        acc += weights[sample] * sampled;
      }
    }
    output[i] = acc;
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const Sizes n, const scalar_t* __restrict__ grad_output,
                                const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ locations,
                                const scalar_t* __restrict__ weights,
                                scalar_t* __restrict__ grad_value,
                                scalar_t* __restrict__ grad_locations,
                                scalar_t* __restrict__ grad_weights) {
  const int64_t row_stride = n.heads * n.channels;
  const int64_t total = n.batch * n.queries * n.heads * n.levels * n.points;
  for (int64_t sample = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       sample < total; sample += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t l = (sample / n.points) % n.levels;
    const int64_t bqh = sample / (n.points * n.levels);
    const int64_t h = bqh % n.heads;
    const int64_t b = bqh / (n.heads * n.queries);
    const int64_t height = shapes[2 * l];
    const int64_t width = shapes[2 * l + 1];
    const BilinearCorners<scalar_t> corners(locations[2 * sample], locations[2 * sample + 1],
                                            height, width);
    if (!corners.any_inside) {
      continue;  // gradients stay zero
    }
    const int64_t base = (b * n.tokens + starts[l]) * row_stride + h * n.channels;
    const scalar_t* g = grad_output + bqh * n.channels;
    const scalar_t attention = weights[sample];
    scalar_t d_attention = 0;
    scalar_t d_x = 0;
    scalar_t d_y = 0;
    for (int k = 0; k < 4; ++k) {
      if (!corners.inside[k]) {
        continue;
      }
      const int64_t row = base + corners.offset[k] * row_stride;
      const scalar_t scale = attention * corners.weight[k];
      scalar_t dot = 0;
      for (int64_t c = 0; c < n.channels; ++c) {
        dot += g[c] * value[row + c];
        gpuAtomicAdd(grad_value + row + c, scale * g[c]);
      }
      d_attention += corners.weight[k] * dot;
      d_x += corners.d_weight_dx[k] * dot;
      d_y += corners.d_weight_dy[k] * dot;
    }
    grad_weights[sample] = d_attention;
    grad_locations[2 * sample] = attention * d_x * static_cast<scalar_t>(width);
    grad_locations[2 * sample + 1] = attention * d_y * static_cast<scalar_t>(height);
  }
}

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto locations_c = sampling_locations.contiguous();
  const auto weights_c = attention_weights.contiguous();
  const Sizes n(value_c, locations_c);
  auto output = at::empty({n.batch, n.queries, n.heads * n.channels}, value.options());
  if (output.numel() == 0) {
    return output.zero_();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<num_blocks(output.numel()), kThreads, 0, stream>>>(
        n, value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(),
        starts_c.data_ptr<int64_t>(), locations_c.data_ptr<scalar_t>(),
        weights_c.data_ptr<scalar_t>(), output.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto locations_c = sampling_locations.contiguous();
  const auto weights_c = attention_weights.contiguous();
  const auto grad_c = grad_output.contiguous();
  const Sizes n(value_c, locations_c);
  TORCH_CHECK(grad_c.numel() == n.batch * n.queries * n.heads * n.channels &&
                  grad_c.scalar_type() == value.scalar_type(),
              "ms_deform_attn backward: grad_output must match the forward output");
  auto grad_value = at::zeros_like(value_c);
  auto grad_locations = at::zeros_like(locations_c);
  auto grad_weights = at::zeros_like(weights_c);
  if (weights_c.numel() == 0) {
    return {grad_value, grad_locations, grad_weights};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    backward_kernel<scalar_t><<<num_blocks(weights_c.numel()), kThreads, 0, stream>>>(
        n, grad_c.data_ptr<scalar_t>(), value_c.data_ptr<scalar_t>(),
        shapes_c.data_ptr<int64_t>(), starts_c.data_ptr<int64_t>(),
        locations_c.data_ptr<scalar_t>(), weights_c.data_ptr<scalar_t>(),
        grad_value.data_ptr<scalar_t>(), grad_locations.data_ptr<scalar_t>(),
        grad_weights.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace
}  // namespace di_maskdino

TORCH_LIBRARY_IMPL(di_maskdino, CUDA, m) {
  m.impl("ms_deform_attn_forward", &di_maskdino::forward_cuda);
  m.impl("ms_deform_attn_backward", &di_maskdino::backward_cuda);
}
