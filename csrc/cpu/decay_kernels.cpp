// CPU kernels of the equivariance-decay ops (schemas in ops/schemas.cpp, CUDA kernels in
// cuda/decay_kernels.cu, per-orbit math in decay_math.h).
//
//   multi_decay_(weights[], offsets[], geometry, coef_dev[], coef_mean[])
//       W_l <- W_l + coef_dev[l] (W_l - P W_l) + coef_mean[l] P W_l          for every layer l, in place
//   multi_decay_grad_(grads[], weights[], offsets[], geometry, coef_dev[], coef_mean[])
//       grad_l <- grad_l + coef_dev[l] (W_l - P W_l) + coef_mean[l] P W_l   for every layer l, in place
//
// One pass over all layers, whatever their number and dtypes (float16, bfloat16, float32, float64;
// the math is float32, float64 for float64 tensors).  offsets and geometry are those of the
// multi_forward op (projkernels/orbits.py, OrbitTable.to): (c_out, c_in, stride_out, stride_in) per
// layer.  The coefficients are plain floats, so a step creates no tensor.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "decay_checks.h"
#include "decay_math.h"
#include "orbit_math.h"
#include "static_switch.h"

namespace projkernels {
namespace decay {
namespace {

// Orbits per CPU task: large enough that the per-chunk dispatch vanishes, small enough that a
// model's small layers still spread over threads.
constexpr int64_t kCpuChunk = 256;

template <typename Fn>
void with_dtype(int32_t code, Fn&& fn) {
  switch (code) {
    case kF32: return fn(float{});
    case kF64: return fn(double{});
    case kF16: return fn(c10::Half{});
    default: return fn(c10::BFloat16{});
  }
}

template <bool IN_PLACE>
void run_cpu(LayerArgs& a) {
  const int64_t L = static_cast<int64_t>(a.layers.size());
  std::vector<Chunk> chunks(assign_chunks(a.layers.data(), L, kCpuChunk));
  list_chunks(a.layers.data(), L, kCpuChunk, chunks.data());
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      const LayerDesc& d = a.layers[ch.layer];
      with_dtype(d.dtype, [&](auto s) {
        using scalar_t = decltype(s);
        using acc_t = at::opmath_type<scalar_t>;
        SIGNED_SWITCH(d.signed_offsets, OFF, [&] {
          GROUP_ORDER_SWITCH(d.G, K, [&] { decay_chunk<K, IN_PLACE, scalar_t, acc_t, OFF>(d, ch.first, ch.last, 1); });
        });
      });
    }
  });
}

void multi_decay_cpu(at::TensorList weights, at::TensorList offsets, at::IntArrayRef geometry,
                     at::ArrayRef<double> coef_dev, at::ArrayRef<double> coef_mean) {
  LayerArgs a = check_decay(weights, nullptr, offsets, geometry, coef_dev, coef_mean, "projkernels_C::multi_decay_");
  run_cpu<true>(a);
}

void multi_decay_grad_cpu(at::TensorList grads, at::TensorList weights, at::TensorList offsets,
                          at::IntArrayRef geometry, at::ArrayRef<double> coef_dev, at::ArrayRef<double> coef_mean) {
  LayerArgs a = check_decay(grads, &weights, offsets, geometry, coef_dev, coef_mean, "projkernels_C::multi_decay_grad_");
  run_cpu<false>(a);
}

}  // namespace
}  // namespace decay
}  // namespace projkernels

TORCH_LIBRARY_IMPL(projkernels_C, CPU, m) {
  m.impl("multi_decay_", &projkernels::decay::multi_decay_cpu);
  m.impl("multi_decay_grad_", &projkernels::decay::multi_decay_grad_cpu);
}
