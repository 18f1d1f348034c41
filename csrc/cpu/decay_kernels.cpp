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

#include <memory>
#include <type_traits>
#include <vector>

#include "decay_checks.h"
#include "decay_math.h"
#include "orbit_math.h"
#include "cpu_orbit_batches.h"
#include "static_switch.h"

namespace projkernels {
namespace decay {
namespace {

template <typename Fn>
void with_dtype(int32_t code, Fn&& fn) {
  switch (code) {
    case kF32: return fn(float{});
    case kF64: return fn(double{});
    case kF16: return fn(c10::Half{});
    default: return fn(c10::BFloat16{});
  }
}

// The batch walk of include/cpu_orbit_batches.h over every layer's chunks (the same partition as the
// penalty ops).  No value is summed across orbits, so the partition only balances the threads.
template <bool IN_PLACE>
void run_cpu(LayerArgs& a) {
  const int64_t L = static_cast<int64_t>(a.layers.size());
  const std::vector<Chunk> chunks = cpu::plan_chunks(a.layers.data(), L);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  // One table per layer in each accumulation type it is read in (float or double).
  std::vector<cpu::BatchTable<float>> tf(L);
  std::vector<cpu::BatchTable<double>> td(L);
  for (int64_t l = 0; l < L; ++l) {
    if (a.layers[l].dtype == kF64) {
      td[l] = cpu::make_table<double>(a.layers[l], false);
    } else {
      tf[l] = cpu::make_table<float>(a.layers[l], false);
    }
  }
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      const LayerDesc& d = a.layers[ch.layer];
      with_dtype(d.dtype, [&](auto tag) {
        using scalar_t = decltype(tag);
        using acc_t = at::opmath_type<scalar_t>;
        cpu::Scratch<acc_t>& scratch = cpu::thread_scratch<acc_t>(d.G, true);
        const cpu::BatchTable<acc_t>& t = [&]() -> const cpu::BatchTable<acc_t>& {
          if constexpr (std::is_same_v<acc_t, double>) return td[ch.layer];
          else return tf[ch.layer];
        }();
        GROUP_ORDER_SWITCH(d.G, K, [&] {
          if (t.is_signed) {
            cpu::chunk_decay<K, true, IN_PLACE, scalar_t, acc_t>(d, t, ch.first, ch.last, scratch);
          } else {
            cpu::chunk_decay<K, false, IN_PLACE, scalar_t, acc_t>(d, t, ch.first, ch.last, scratch);
          }
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
