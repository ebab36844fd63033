// CPU kernels of multi-scale deformable attention; shapes, dtypes and sampling rule in
// ms_deform_attn.h. value, output and grad_output are scalar_t (float64, float32, float16,
// bfloat16); locations, weights, their gradients and every sum are acc_t, the type
// at::opmath_type gives (float32 for the half types).
//
// Both kernels are bound by the latency of gathering value rows, so the entry points first
// copy value into the layout (B, H, S, C), where the rows one head samples are contiguous
// (the backward's value gradient too), and the kernels compute a query's corners and
// prefetch their rows before they sum. Work is handed out dynamically (parallel_claims).
//
// Forward: work is split over (batch, query) pairs; every pair owns its output row.
//
// Backward: work is split over (batch, head, level, band of rows of that level). An item owns
//   - the value-gradient rows of its band: grad_value[b, start_l + y * W_l + x, h, :] for
//     the rows y of the band, and
//   - the location and weight gradients of the samples of its (batch, head, level) whose
//     upper corner row, clamped to the map, lies in its band.
// It walks every sample of its (batch, head, level) in (query, point) order and keeps what
// lands in its band. No two items write to the same memory (no atomics, no per-thread
// buffers), and every value-gradient row receives its contributions in (query, point) order
// however many bands there are, so the result does not depend on the number of threads.
// Bands are added only when B * H * L items are too few to keep every thread busy (four per
// thread); each band then re-reads the level's locations to find its samples.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../ms_deform_attn.h"

namespace di_maskdino {
namespace {

using Sizes = MsDeformAttnSizes;

// Asks for the cache lines of a row of `n` values before it is read: the kernels are bound by
// the latency of these gathers.
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
#if defined(__GNUC__)
  for (int64_t offset = 0; offset < n * static_cast<int64_t>(sizeof(T)); offset += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(row) + offset);
  }
#else
  (void)row;
  (void)n;
#endif
}

// Runs `worker(claim)` once on each of ATen's threads (at most one per `grain` items);
// claim(begin, end) hands out the next unclaimed `grain` items of [0, count) until none are
// left. Threads that finish early take more work, which matters when items differ in cost
// and when other processes share the cores (a static split waits for the slowest thread).
// The items must be independent.
template <typename Worker>
void parallel_claims(int64_t count, int64_t grain, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (count + grain - 1) / grain);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    worker([&](int64_t& begin, int64_t& end) {
      begin = next.fetch_add(grain);
      end = std::min(begin + grain, count);
      return begin < count;
    });
  });
}

// acc[c] += scale * v[c] for c < n.
template <typename acc_t, typename scalar_t>
inline void add_scaled(acc_t* __restrict__ acc, acc_t scale, const scalar_t* __restrict__ v,
                       int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    acc[c] += scale * static_cast<acc_t>(v[c]);
  }
}

// sum_c g[c] * v[c], with eight partial sums so that the compiler may vectorise it (a single
// running sum is a chain of dependent additions that it must not reorder).
template <typename acc_t, typename scalar_t>
inline acc_t dot(const acc_t* __restrict__ g, const scalar_t* __restrict__ v, int64_t n) {
  constexpr int kPartials = 8;
  acc_t partial[kPartials] = {};
  int64_t c = 0;
  for (; c + kPartials <= n; c += kPartials) {
    for (int j = 0; j < kPartials; ++j) {
      partial[j] += g[c + j] * static_cast<acc_t>(v[c + j]);
    }
  }
  for (; c < n; ++c) {
    partial[0] += g[c] * static_cast<acc_t>(v[c]);
  }
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
         ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

// out[c] = sum_i scales[i] * rows[i][c] for c < n.
template <typename scalar_t, typename acc_t>
inline void weighted_row_sum(const scalar_t* const* rows, const acc_t* scales, int64_t count,
                             int64_t n, acc_t* acc, scalar_t* out) {
  std::fill(acc, acc + n, acc_t(0));
  for (int64_t i = 0; i < count; ++i) {
    add_scaled(acc, scales[i], rows[i], n);
  }
  for (int64_t c = 0; c < n; ++c) {
    out[c] = static_cast<scalar_t>(acc[c]);
  }
}

#if defined(__SSE2__)
// The same for rows of 32 float32 channels (the released models: 256 wide, 8 heads), summed
// in eight SSE registers (SSE2 is part of x86-64) in the same order: identical results
// without floating-point contraction into FMA (x86-64's default flags). The generic loop
// keeps its sums in memory, loading and storing them for every row, which made it the
// forward's bottleneck: this is 1.3-1.7x faster on the encoder's 22k queries at 800 x 1333.
inline void weighted_row_sum_32(const float* const* rows, const float* scales, int64_t count,
                                float* out) {
  __m128 sums[8];
  for (int j = 0; j < 8; ++j) {
    sums[j] = _mm_setzero_ps();
  }
  for (int64_t i = 0; i < count; ++i) {
    const float* row = rows[i];
    const __m128 scale = _mm_set1_ps(scales[i]);
    for (int j = 0; j < 8; ++j) {
      sums[j] = _mm_add_ps(sums[j], _mm_mul_ps(scale, _mm_loadu_ps(row + 4 * j)));
    }
  }
  for (int j = 0; j < 8; ++j) {
    _mm_storeu_ps(out + 4 * j, sums[j]);
  }
}
#endif

// value in the layout (B, H, S, C). The corners of all L * P samples of a query-head are
// computed (their rows prefetched) before the sum.
template <typename scalar_t, typename acc_t>
void forward_kernel(const Sizes& n, const scalar_t* value, const int64_t* shapes,
                    const int64_t* starts, const acc_t* locations, const acc_t* weights,
                    scalar_t* output) {
  parallel_claims(n.batch * n.queries, 16, [&](const auto& claim) {
    std::vector<acc_t> acc(n.channels);
    std::vector<const scalar_t*> rows(4 * n.levels * n.points);
    std::vector<acc_t> scales(4 * n.levels * n.points);
    for (int64_t begin = 0, end = 0; claim(begin, end);) {
      for (int64_t bq = begin; bq < end; ++bq) {
        const int64_t b = bq / n.queries;
        for (int64_t h = 0; h < n.heads; ++h) {
          const int64_t bqh = bq * n.heads + h;
          const scalar_t* value_bh = value + (b * n.heads + h) * n.tokens * n.channels;
          int64_t count = 0;
          for (int64_t l = 0; l < n.levels; ++l) {
            const scalar_t* value_l = value_bh + starts[l] * n.channels;
            for (int64_t p = 0; p < n.points; ++p) {
              const int64_t sample = (bqh * n.levels + l) * n.points + p;
              const BilinearCorners<acc_t> corners(locations[2 * sample],
                                                   locations[2 * sample + 1], shapes[2 * l],
                                                   shapes[2 * l + 1]);
              if (!corners.any_inside) {
                continue;
              }
              const acc_t attention = weights[sample];
              for (int k = 0; k < 4; ++k) {
                if (corners.inside[k]) {
                  rows[count] = value_l + corners.offset[k] * n.channels;
                  scales[count] = attention * corners.weight[k];
                  prefetch_row(rows[count], n.channels);
                  ++count;
                }
              }
            }
          }
          scalar_t* out = output + bqh * n.channels;
#if defined(__SSE2__)
          if constexpr (std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
            if (n.channels == 32) {
              weighted_row_sum_32(rows.data(), scales.data(), count, out);
              continue;
            }
          }
#endif
          weighted_row_sum(rows.data(), scales.data(), count, n.channels, acc.data(), out);
        }
      }
    }
  });
}

// value and grad_value in the layout (B, H, S, C), the other tensors as in ms_deform_attn.h.
// An item reads one (head, level) slice of every query's locations, weights and grad_output
// row, so these are prefetched two queries ahead.
template <typename scalar_t, typename acc_t>
void backward_kernel(const Sizes& n, const scalar_t* grad_output, const acc_t* value,
                     const int64_t* shapes, const int64_t* starts, const acc_t* locations,
                     const acc_t* weights, acc_t* grad_value, acc_t* grad_locations,
                     acc_t* grad_weights) {
  const int64_t level_items = n.batch * n.heads * n.levels;
  if (level_items == 0) {
    return;
  }
  // Four items per thread balance levels of different cost well enough.
  const int64_t wanted = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t bands = std::max<int64_t>(1, (wanted + level_items - 1) / level_items);
  parallel_claims(level_items * bands, 1, [&](const auto& claim) {
    std::vector<int64_t> samples(n.points);  // the query's samples that touch the band
    std::vector<BilinearCorners<acc_t>> corner_sets(n.points,
                                                    BilinearCorners<acc_t>(-2, -2, 1, 1));
    std::vector<acc_t> g_converted(std::is_same<scalar_t, acc_t>::value ? 0 : n.channels);
    for (int64_t item = 0, end = 0; claim(item, end);) {
      const int64_t band = item % bands;
      const int64_t bhl = item / bands;  // ((b * H) + h) * L + l
      const int64_t l = bhl % n.levels;
      const int64_t bh = bhl / n.levels;
      const int64_t height = shapes[2 * l];
      const int64_t width = shapes[2 * l + 1];
      const int64_t lo = band * height / bands;  // rows [lo, hi) of the level
      const int64_t hi = (band + 1) * height / bands;
      if (lo >= hi) {
        continue;  // more bands than rows
      }
      const bool whole_level = lo == 0 && hi == height;
      const int64_t level_base = (bh * n.tokens + starts[l]) * n.channels;
      const acc_t* value_l = value + level_base;
      acc_t* grad_value_l = grad_value + level_base;
      const int64_t b = bh / n.heads;
      const int64_t h = bh % n.heads;
      // sample (q, p) of the item is (((b Q + q) H + h) L + l) P + p
      const int64_t sample_stride = n.heads * n.levels * n.points;  // from a query to the next
      const int64_t first_sample = ((b * n.queries * n.heads + h) * n.levels + l) * n.points;
      const int64_t g_stride = n.heads * n.channels;
      const scalar_t* g_first = grad_output + (b * n.queries * n.heads + h) * n.channels;
      constexpr int64_t kAhead = 2;
      for (int64_t q = 0; q < n.queries; ++q) {
        if (q + kAhead < n.queries) {
          const int64_t ahead = first_sample + (q + kAhead) * sample_stride;
          prefetch_row(locations + 2 * ahead, 2 * n.points);
          prefetch_row(weights + ahead, n.points);
          prefetch_row(g_first + (q + kAhead) * g_stride, n.channels);
        }
        const scalar_t* g_row = g_first + q * g_stride;
        const acc_t* g = nullptr;  // g_row in acc_t
        // The corners of the query's P samples first, prefetching the rows they touch.
        int64_t count = 0;
        for (int64_t p = 0; p < n.points; ++p) {
          const int64_t sample = first_sample + q * sample_stride + p;
          if (!whole_level) {
            // Cheap test on the row alone before the full bilinear geometry.
            const acc_t y = locations[2 * sample + 1] * static_cast<acc_t>(height) - acc_t(0.5);
            if (!(y > -1 && y < height)) {
              continue;
            }
            const int64_t y0 = static_cast<int64_t>(std::floor(y));
            const int64_t owner_row = std::max<int64_t>(y0, 0);
            if (!((owner_row >= lo && owner_row < hi) || (y0 + 1 >= lo && y0 + 1 < hi))) {
              continue;
            }
          }
          const BilinearCorners<acc_t> corners(locations[2 * sample], locations[2 * sample + 1],
                                               height, width);
          if (!corners.any_inside) {
            continue;  // gradients stay zero
          }
          for (int k = 0; k < 4; ++k) {
            if (corners.inside[k]) {
              prefetch_row(value_l + corners.offset[k] * n.channels, n.channels);
              prefetch_row(grad_value_l + corners.offset[k] * n.channels, n.channels);
            }
          }
          samples[count] = sample;
          corner_sets[count] = corners;
          ++count;
        }
        if (count > 0) {
          if constexpr (std::is_same<scalar_t, acc_t>::value) {
            g = g_row;
          } else {
            for (int64_t c = 0; c < n.channels; ++c) {
              g_converted[c] = static_cast<acc_t>(g_row[c]);
            }
            g = g_converted.data();
          }
        }
        for (int64_t i = 0; i < count; ++i) {
          const int64_t sample = samples[i];
          const BilinearCorners<acc_t>& corners = corner_sets[i];
          const int64_t owner_row = std::min(std::max<int64_t>(corners.y0, 0), height - 1);
          const bool owns_sample = whole_level || (owner_row >= lo && owner_row < hi);
          const acc_t attention = weights[sample];
          acc_t d_attention = 0;  // d out / d attention = sampled value . g
          acc_t d_x = 0;          // d out / d x, before the attention factor
          acc_t d_y = 0;
          for (int k = 0; k < 4; ++k) {
            if (!corners.inside[k]) {
              continue;
            }
            const int64_t row_y = corners.y0 + k / 2;
            const bool owns_row = whole_level || (row_y >= lo && row_y < hi);
            const int64_t row = corners.offset[k] * n.channels;
            if (owns_sample) {
              const acc_t g_dot_v = dot(g, value_l + row, n.channels);
              d_attention += corners.weight[k] * g_dot_v;
              d_x += corners.d_weight_dx[k] * g_dot_v;
              d_y += corners.d_weight_dy[k] * g_dot_v;
            }
            if (owns_row) {
              add_scaled(grad_value_l + row, attention * corners.weight[k], g, n.channels);
            }
          }
          if (owns_sample) {
            grad_weights[sample] = d_attention;
            // x_pixel = x * W - 0.5, so d x_pixel / d x = W (and H for y).
            grad_locations[2 * sample] = attention * d_x * static_cast<acc_t>(width);
            grad_locations[2 * sample + 1] = attention * d_y * static_cast<acc_t>(height);
          }
        }
      }
    }
  });
}

struct Prepared {
  at::Tensor value, shapes, starts, locations, weights;
};

// `tensor` (B, S, H, C) copied into the layout (B, H, S, C), as `dtype`, in one pass.
at::Tensor heads_first(const at::Tensor& tensor, at::ScalarType dtype) {
  auto result = at::empty({tensor.size(0), tensor.size(2), tensor.size(1), tensor.size(3)},
                          tensor.options().dtype(dtype));
  return result.copy_(tensor.permute({0, 2, 1, 3}));
}

Prepared prepare(const at::Tensor& value, const at::Tensor& spatial_shapes,
                 const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                 const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  Prepared p{value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
             sampling_locations.contiguous(), attention_weights.contiguous()};
  check_level_layout_on_host(p.shapes, p.starts, p.value.size(1));
  return p;
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Prepared in = prepare(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  const Sizes n(in.value, in.locations);
  const auto value_t = heads_first(in.value, value.scalar_type());
  auto output = at::empty({n.batch, n.queries, n.heads * n.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        forward_kernel<scalar_t, acc_t>(
            n, value_t.data_ptr<scalar_t>(), in.shapes.data_ptr<int64_t>(),
            in.starts.data_ptr<int64_t>(), in.locations.data_ptr<acc_t>(),
            in.weights.data_ptr<acc_t>(), output.data_ptr<scalar_t>());
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const Prepared in = prepare(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  const Sizes n(in.value, in.locations);
  check_ms_deform_attn_grad_output(grad_output, value, n);
  const auto acc_type = in.locations.scalar_type();  // opmath type of value
  // value in the kernel's layout and in acc_t (the half types are converted here)
  const auto value_t = heads_first(in.value, acc_type);
  const auto grad = grad_output.contiguous();
  auto grad_value_t = at::zeros_like(value_t);
  auto grad_locations = at::zeros_like(in.locations);
  auto grad_weights = at::zeros_like(in.weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        backward_kernel<scalar_t, acc_t>(
            n, grad.data_ptr<scalar_t>(), value_t.data_ptr<acc_t>(), in.shapes.data_ptr<int64_t>(),
            in.starts.data_ptr<int64_t>(), in.locations.data_ptr<acc_t>(),
            in.weights.data_ptr<acc_t>(), grad_value_t.data_ptr<acc_t>(),
            grad_locations.data_ptr<acc_t>(), grad_weights.data_ptr<acc_t>());
      });
  auto grad_value = heads_first(grad_value_t, value.scalar_type());  // back to (B, S, H, C)
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace di_maskdino
