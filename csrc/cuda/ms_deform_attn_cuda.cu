// CUDA entry points of multi-scale deformable attention: argument checks, dtype and variant
// dispatch, launches. The kernels are in ms_deform_attn_kernels.cuh.
//
// This file also compiles as C++ for the host simulation (DI_MASKDINO_HOST_SIM, see
// ../host_sim/): the tests then call these very entry points on CPU tensors, and each launch
// runs the kernel's threads on the CPU. Only the few lines under DI_MASKDINO_HOST_SIM differ.
//
// Checks. The same argument checks as the CPU entry points (../checks.cpp). The level layout
// (spatial_shapes and level_start_index against S) lives on the GPU, and reading it here
// would synchronise with the device on every call, so a one-thread kernel checks it with the
// CPU's function before the sampling kernels run: a bad layout stops the stream with a
// device-side assert instead of reading (forward) or adding into (backward) foreign memory.
//
// Determinism. The value gradient is summed with float atomics, whose order varies from run
// to run. Under torch.use_deterministic_algorithms(True) the backward instead sorts the
// (sample, corner) pairs by the value row they land on and sums every row in a fixed order
// (more memory: about 28 bytes per pair, 4 pairs per sample).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#if defined(DI_MASKDINO_HOST_SIM)
#include "../host_sim/cuda_host_sim.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "ms_deform_attn_kernels.cuh"

namespace di_maskdino {
namespace {

using Sizes = MsDeformAttnSizes;
using namespace cuda_kernels;

constexpr int kThreads = 256;  // per block, a multiple of the warp size

// What a launch runs, for the simulation's record (tests check that each variant ran).
struct Variant {
  const char* kernel;
  int vector;  // V
  int group;   // lanes per query-head
  int levels;  // compile-time L (0: read at run time)
  int points;  // compile-time P
};

#if defined(DI_MASKDINO_HOST_SIM)
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
int64_t resident_blocks() { return host_sim::simulator().grid_cap; }
#else
using DeviceGuard = c10::cuda::CUDAGuard;
int64_t resident_blocks() {
  // (ATen/cuda/CUDAContext.h would cache this, but it needs the cuSPARSE / cuBLAS headers,
  // which minimal toolkits lack.)
  const int device = c10::cuda::current_device();
  int processors = 0;
  int threads_per_processor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_processor,
                                        cudaDevAttrMaxThreadsPerMultiProcessor, device));
  return static_cast<int64_t>(processors) * std::max(1, threads_per_processor / kThreads);
}
#endif

// Grid for `units` independent pieces of work, `per_block` per block; grid-stride loops in
// the kernels cover what a grid capped at the resident blocks does not.
int64_t grid_for(int64_t units, int64_t per_block) {
  return std::min((units + per_block - 1) / per_block, resident_blocks());
}

template <typename... Params, typename... Args>
void launch(const Variant& variant, void (*kernel)(Params...), int64_t blocks, int threads,
            Args... args) {
  if (blocks <= 0) {
    return;
  }
#if defined(DI_MASKDINO_HOST_SIM)
  host_sim::launch(host_sim::describe(variant.kernel, variant.vector, variant.group,
                                      variant.levels, variant.points),
                   blocks, threads, [&] { kernel(args...); });
#else
  (void)variant;
  kernel<<<static_cast<unsigned int>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// Channels per 16-byte load when C and every pointer allow it, else 1.
template <typename scalar_t>
constexpr int kWideVector = 16 / static_cast<int>(sizeof(scalar_t));

template <typename scalar_t>
int vector_width(int64_t channels, std::initializer_list<const void*> pointers) {
  constexpr int wide = kWideVector<scalar_t>;
  if (channels % wide != 0) {
    return 1;
  }
  for (const void* pointer : pointers) {
    if (reinterpret_cast<std::uintptr_t>(pointer) % (wide * sizeof(scalar_t)) != 0) {
      return 1;
    }
  }
  return wide;
}

// Lanes per query-head: enough for one vector each, a power of two, at most a warp.
int lane_group(int64_t channels, int vector) {
  const int64_t needed = (channels + vector - 1) / vector;
  int group = 1;
  while (group < needed && group < kWarpSize) {
    group *= 2;
  }
  return group;
}

void check_level_layout_on_device(const at::Tensor& shapes, const at::Tensor& starts,
                                  int64_t tokens) {
  launch(Variant{"check_level_layout", 1, 1, 0, 0}, check_level_layout_kernel, 1, kWarpSize,
         shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), shapes.size(0), tokens);
}

struct Prepared {
  at::Tensor value, shapes, starts, locations, weights;
};

Prepared prepare(const at::Tensor& value, const at::Tensor& spatial_shapes,
                 const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                 const at::Tensor& attention_weights) {
  Prepared p{value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
             sampling_locations.contiguous(), attention_weights.contiguous()};
  check_level_layout_on_device(p.shapes, p.starts, p.value.size(1));
  return p;
}

template <typename scalar_t, int V>
void launch_forward(const Sizes& n, int group, const Prepared& in, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t blocks = grid_for(n.batch * n.queries * n.heads, kThreads / group);
  const bool model_shape = n.levels == 4 && n.points == 4;
  auto kernel = model_shape ? forward_kernel<scalar_t, V, 4, 4> : forward_kernel<scalar_t, V, 0, 0>;
  launch(Variant{"forward", V, group, model_shape ? 4 : 0, model_shape ? 4 : 0}, kernel, blocks,
         kThreads, n, group, in.value.data_ptr<scalar_t>(), in.shapes.data_ptr<int64_t>(),
         in.starts.data_ptr<int64_t>(), in.locations.data_ptr<acc_t>(),
         in.weights.data_ptr<acc_t>(), output.data_ptr<scalar_t>());
}

// grad_value_acc null: location and weight gradients only (the deterministic path).
template <typename scalar_t, int V>
void launch_backward(const Sizes& n, int group, const Prepared& in, const at::Tensor& grad,
                     at::opmath_type<scalar_t>* grad_value_acc, at::Tensor& grad_locations,
                     at::Tensor& grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups_per_warp = kWarpSize / group;
  const int64_t warps = (n.batch * n.queries * n.heads + groups_per_warp - 1) / groups_per_warp;
  const int64_t blocks = grid_for(warps, kThreads / kWarpSize);
  const bool model_shape = n.levels == 4 && n.points == 4;
  auto kernel =
      model_shape ? backward_kernel<scalar_t, V, 4, 4> : backward_kernel<scalar_t, V, 0, 0>;
  launch(Variant{"backward", V, group, model_shape ? 4 : 0, model_shape ? 4 : 0}, kernel, blocks,
         kThreads, n, group, grad.data_ptr<scalar_t>(), in.value.data_ptr<scalar_t>(),
         in.shapes.data_ptr<int64_t>(), in.starts.data_ptr<int64_t>(),
         in.locations.data_ptr<acc_t>(), in.weights.data_ptr<acc_t>(), grad_value_acc,
         grad_locations.data_ptr<acc_t>(), grad_weights.data_ptr<acc_t>());
}

template <typename scalar_t, int V>
at::Tensor deterministic_value_grad(const Sizes& n, int group, const Prepared& in,
                                    const at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  auto grad_value = at::zeros(in.value.sizes(), in.value.options());
  const int64_t pairs = 4 * in.weights.numel();
  if (pairs == 0 || n.channels == 0) {
    return grad_value;
  }
  auto rows = at::empty({pairs}, in.shapes.options());
  auto scales = at::empty({pairs}, in.locations.options());
  launch(Variant{"corner_rows", 1, 1, 0, 0}, corner_rows_kernel<acc_t>,
         grid_for(pairs, kThreads), kThreads, n, in.shapes.data_ptr<int64_t>(),
         in.starts.data_ptr<int64_t>(), in.locations.data_ptr<acc_t>(),
         in.weights.data_ptr<acc_t>(), rows.data_ptr<int64_t>(), scales.data_ptr<acc_t>());
  const auto sorted = at::sort(rows, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted_rows = std::get<0>(sorted);
  const at::Tensor& order = std::get<1>(sorted);
  launch(Variant{"value_grad_from_sorted", V, group, 0, 0},
         value_grad_from_sorted_kernel<scalar_t, V>, grid_for(pairs, kThreads / group), kThreads,
         n, group, pairs, sorted_rows.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
         scales.data_ptr<acc_t>(), grad.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>());
  return grad_value;
}

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  const DeviceGuard guard(value.device());
  const Prepared in = prepare(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  const Sizes n(in.value, in.locations);
  auto output = at::empty({n.batch, n.queries, n.heads * n.channels}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        const int vector =
            vector_width<scalar_t>(n.channels, {in.value.data_ptr(), output.data_ptr()});
        const int group = lane_group(n.channels, vector);
        if (vector == 1) {
          launch_forward<scalar_t, 1>(n, group, in, output);
        } else {
          launch_forward<scalar_t, kWideVector<scalar_t>>(n, group, in, output);
        }
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  const Sizes n(value, sampling_locations);
  check_ms_deform_attn_grad_output(grad_output, value, n);
  const DeviceGuard guard(value.device());
  const Prepared in = prepare(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  const auto grad = grad_output.contiguous();
  auto grad_locations = at::zeros(in.locations.sizes(), in.locations.options());
  auto grad_weights = at::zeros(in.weights.sizes(), in.weights.options());
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor grad_value;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int vector =
            vector_width<scalar_t>(n.channels, {in.value.data_ptr(), grad.data_ptr()});
        const int group = lane_group(n.channels, vector);
        if (deterministic) {
          if (vector == 1) {
            launch_backward<scalar_t, 1>(n, group, in, grad, nullptr, grad_locations,
                                         grad_weights);
            grad_value = deterministic_value_grad<scalar_t, 1>(n, group, in, grad);
          } else {
            constexpr int V = kWideVector<scalar_t>;
            launch_backward<scalar_t, V>(n, group, in, grad, nullptr, grad_locations,
                                         grad_weights);
            grad_value = deterministic_value_grad<scalar_t, V>(n, group, in, grad);
          }
          return;
        }
        // float32 sums for the half types (rounded once at the end); the tensor itself
        // for float32 and float64.
        auto grad_value_acc = at::zeros(in.value.sizes(), in.locations.options());
        if (vector == 1) {
          launch_backward<scalar_t, 1>(n, group, in, grad, grad_value_acc.data_ptr<acc_t>(),
                                       grad_locations, grad_weights);
        } else {
          launch_backward<scalar_t, kWideVector<scalar_t>>(
              n, group, in, grad, grad_value_acc.data_ptr<acc_t>(), grad_locations,
              grad_weights);
        }
        grad_value = grad_value_acc.to(value.scalar_type());
      });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace
}  // namespace di_maskdino

#if !defined(DI_MASKDINO_HOST_SIM)
TORCH_LIBRARY_IMPL(di_maskdino, CUDA, m) {
  m.impl("ms_deform_attn_forward", &di_maskdino::forward_cuda);
  m.impl("ms_deform_attn_backward", &di_maskdino::backward_cuda);
}
#endif
