// The CUDA entry points and kernels of csrc/cuda/, compiled for the host under the
// simulation of cuda_host_sim.h, as a Python module for the tests. It is not part of the
// package: tests/ops/cuda_host_sim.py builds it on the fly (torch.utils.cpp_extension.load,
// cached under build/host_sim/) together with csrc/checks.cpp.
//
//   forward / backward      the CUDA entry points (ms_deform_attn_cuda.cu), on CPU tensors
//   set_grid_cap            the "resident blocks" the entry points size their grids with;
//                           small values force the kernels' grid-stride loops to iterate
//   reset / atomic_adds / launches
//                           what the last calls did (atomicAdd calls; kernel, variant,
//                           blocks and threads of every launch)
//   shuffle / misuse        self-tests of the simulation's warp primitives
#include <torch/extension.h>

#define DI_MASKDINO_HOST_SIM 1
#include "cuda_host_sim.h"
// clang-format off
#include "../cuda/ms_deform_attn_cuda.cu"
// clang-format on

namespace di_maskdino {
namespace host_sim_selftest {

constexpr unsigned kFull = 0xffffffffu;

// out[i] = the shuffle `op` of in[i] (one element per thread of the grid).
__global__ void shuffle_kernel(int op, int argument, int width, const float* in, float* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const float v = in[i];
  float r = 0;
  switch (op) {
    case 0: r = __shfl_xor_sync(kFull, v, argument, width); break;
    case 1: r = __shfl_down_sync(kFull, v, static_cast<unsigned>(argument), width); break;
    case 2: r = __shfl_up_sync(kFull, v, static_cast<unsigned>(argument), width); break;
    default: r = __shfl_sync(kFull, v, argument, width); break;
  }
  out[i] = r;
}

// Misuses the simulation must report rather than run.
__global__ void misuse_kernel(int kind, float* out) {
  const int lane = threadIdx.x % 32;
  switch (kind) {
    case 0:  // odd lanes skip a full-mask shuffle
      if (lane % 2 == 0) {
        out[threadIdx.x] = __shfl_xor_sync(kFull, 1.0f, 2);
      }
      break;
    case 1:  // a mask without the calling lane
      out[threadIdx.x] = __shfl_xor_sync(lane < 16 ? 0xffff0000u : 0x0000ffffu, 1.0f, 1);
      break;
    case 2:  // a half-warp mask whose shuffle reads the other half
      out[threadIdx.x] =
          __shfl_xor_sync(lane < 16 ? 0x0000ffffu : 0xffff0000u, 1.0f, 16);
      break;
    case 3:  // lanes of one mask at two different shuffles
      out[threadIdx.x] = lane < 8 ? __shfl_xor_sync(kFull, 1.0f, 1)
                                  : __shfl_down_sync(kFull, 1.0f, 1u);
      break;
    default:  // a failing device-side check
      DI_DEVICE_CHECK(threadIdx.x != 5, "selftest: thread 5 fails its check");
      out[threadIdx.x] = 1.0f;
      break;
  }
}

}  // namespace host_sim_selftest
}  // namespace di_maskdino

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace sim = di_maskdino::host_sim;
  namespace selftest = di_maskdino::host_sim_selftest;
  m.doc() = "CUDA kernels of di_maskdino run on the host under a simulation of CUDA threads";
  m.def("forward", &di_maskdino::forward_cuda);
  m.def("backward", &di_maskdino::backward_cuda);
  m.def("set_grid_cap", [](int64_t blocks) { sim::simulator().grid_cap = blocks; });
  m.def("reset", [] {
    sim::simulator().atomic_adds = 0;
    sim::simulator().launches.clear();
  });
  m.def("atomic_adds", [] { return sim::simulator().atomic_adds; });
  m.def("launches", [] {
    std::vector<std::tuple<std::string, int64_t, int>> records;
    for (const auto& r : sim::simulator().launches) {
      records.emplace_back(r.description, r.blocks, r.threads);
    }
    return records;
  });
  m.def("shuffle", [](int op, const at::Tensor& in, int argument, int width, int threads) {
    TORCH_CHECK(in.scalar_type() == at::kFloat && in.is_contiguous() && in.numel() % threads == 0);
    auto out = at::empty_like(in);
    const float* in_ptr = in.data_ptr<float>();
    float* out_ptr = out.data_ptr<float>();
    sim::launch("shuffle", in.numel() / threads, threads,
                [&] { selftest::shuffle_kernel(op, argument, width, in_ptr, out_ptr); });
    return out;
  });
  m.def("misuse", [](int kind) {
    auto out = at::zeros({64}, at::kFloat);
    float* out_ptr = out.data_ptr<float>();
    sim::launch("misuse", 1, 64, [&] { selftest::misuse_kernel(kind, out_ptr); });
    return out;
  });
}
