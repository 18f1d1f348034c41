// The kernels' parameter struct (LayerDesc, multi_math.h) for one validated weight, shared by the
// single-weight CPU and CUDA ops (the multi-tensor ops fill theirs in check_multi).
#pragma once

#include <ATen/ATen.h>

#include "multi_math.h"
#include "op_checks.h"

namespace projkernels {

// w: the contiguous weight the table describes; grad: dW's storage (backward) or nullptr.
inline LayerDesc describe(const OrbitArgs& t, const at::Tensor& w, void* grad) {
  LayerDesc d{};
  d.weight = w.const_data_ptr();
  d.grad = grad;
  d.offsets = t.offsets.const_data_ptr<int32_t>();
  d.inv_stab = t.inv_stab.const_data_ptr<double>();
  d.c_in = t.c_in;
  d.stride_out = t.stride_out;
  d.stride_in = t.stride_in;
  d.orbits_per_block = t.orbits_per_block;
  d.n_orbits = t.n_orbits();
  d.G = static_cast<int32_t>(t.G);
  return d;
}

}  // namespace projkernels
