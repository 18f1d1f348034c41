// Argument validation of the projkernels_C::multi_decay_ ops, shared by the CPU and CUDA
// implementations.  The targets are updated in place, so they must be contiguous (a contiguous
// copy would be updated and thrown away); the Python wrapper in projkernels/decay.py guarantees it.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "layer_desc.h"
#include "op_checks.h"  // LayerArgs, dtype_code
#include "orbit_math.h"

namespace projkernels {
namespace decay {

// The descriptors of one call (chunk ranges not yet assigned): a LayerArgs (op_checks.h) whose
// `keep` is empty, the targets being the caller's own contiguous tensors.
//
// targets: the tensors updated in place; weights: the tensors P is taken of (nullptr: the targets
// themselves, the decoupled step).  geometry lists (c_out, c_in, stride_out, stride_in, signed_offsets)
// per layer.
inline LayerArgs check_decay(at::TensorList targets, const at::TensorList* weights, at::TensorList offsets,
                             at::IntArrayRef geometry, at::ArrayRef<double> coef_dev,
                             at::ArrayRef<double> coef_mean, const char* op) {
  const int64_t L = static_cast<int64_t>(targets.size());
  const char* what = weights ? "grads" : "weights";
  TORCH_CHECK(L >= 1, op, ": ", what, " is empty; pass at least one tensor");
  TORCH_CHECK(L <= INT32_MAX, op, ": too many tensors (", L, ")");
  TORCH_CHECK(!weights || static_cast<int64_t>(weights->size()) == L, op, ": expected one weight per grad (", L,
              "), got ", weights ? weights->size() : 0);
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == L, op, ": expected one offsets tensor per ", what, " entry (",
              L, "), got ", offsets.size());
  TORCH_CHECK(static_cast<int64_t>(geometry.size()) == kLayerGeometry * L, op,
              ": geometry must hold (c_out, c_in, stride_out, stride_in, signed_offsets) per tensor, i.e. ",
              kLayerGeometry * L, " ints, got ", geometry.size());
  TORCH_CHECK(static_cast<int64_t>(coef_dev.size()) == L && static_cast<int64_t>(coef_mean.size()) == L, op,
              ": coef_dev and coef_mean must hold one value per tensor (", L, "), got ", coef_dev.size(), " and ",
              coef_mean.size());
  LayerArgs a;
  TORCH_CHECK(targets[0].defined(), op, ": ", what, "[0] is undefined");
  a.device = targets[0].device();
  a.layers.reserve(L);
  for (int64_t l = 0; l < L; ++l) {
    const std::string name = std::string(op) + " (" + what + "[" + std::to_string(l) + "])";
    const at::Tensor& t = targets[l];
    TORCH_CHECK(t.defined(), name, ": undefined tensor");
    const int32_t code = dtype_code(t.scalar_type());
    TORCH_CHECK(code >= 0, name, ": must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.device() == a.device, name, ": every tensor of one call must be on ", what, "[0]'s device (",
                a.device, "), got ", t.device());
    TORCH_CHECK(t.is_contiguous(), name, ": must be contiguous (it is updated in place), got strides ", t.strides());
    const at::Tensor& w = weights ? (*weights)[l] : t;
    if (weights) {
      TORCH_CHECK(w.defined(), name, ": its weight is undefined");
      TORCH_CHECK(w.scalar_type() == t.scalar_type() && w.numel() == t.numel(), name,
                  ": must have its weight's dtype and size (", w.scalar_type(), ", ", w.numel(), " entries), got ",
                  t.scalar_type(), ", ", t.numel(), " entries");
      TORCH_CHECK(w.device() == a.device, name, ": its weight is on ", w.device(), ", not on ", a.device);
      TORCH_CHECK(w.is_contiguous(), name, ": its weight must be contiguous, got strides ", w.strides());
      TORCH_CHECK(!w.is_same(t) && w.data_ptr() != t.data_ptr(), name,
                  ": a grad must not share memory with its weight");
    }
    const at::Tensor& o = offsets[l];
    TORCH_CHECK(o.defined(), name, ": offsets is undefined");
    TORCH_CHECK(o.scalar_type() == at::kInt && o.dim() == 2, name,
                ": offsets must be a 2-D int32 tensor [orbits per block, |G|], got ", o.scalar_type(), " of shape ",
                o.sizes());
    TORCH_CHECK(o.is_contiguous() && o.device() == a.device, name, ": offsets must be contiguous and on ", a.device);
    const int64_t G = o.size(1);
    TORCH_CHECK(G >= 1 && G <= kMaxGroupOrder, name, ": the group order (offsets.size(1)) must be in [1, ",
                kMaxGroupOrder, "], got ", G);
    TORCH_CHECK(o.size(0) >= 1, name, ": offsets lists no orbits");
    const int64_t* g = geometry.data() + kLayerGeometry * l;
    const int64_t c_out = g[0], c_in = g[1], stride_out = g[2], stride_in = g[3];
    const bool signed_offsets = g[4] != 0;
    TORCH_CHECK(c_out >= 1 && c_in >= 1 && stride_out >= 0 && stride_in >= 0, name,
                ": geometry needs positive c_out, c_in and non-negative strides, got (", c_out, ", ", c_in, ", ",
                stride_out, ", ", stride_in, ")");
    TORCH_CHECK(t.numel() == c_out * stride_out, name, ": has ", t.numel(),
                " entries but its geometry describes c_out * stride_out = ", c_out * stride_out);
    if (a.device.is_cpu()) {
      // The table is a few hundred ints: a plain loop costs nothing next to the update (an ATen
      // reduction per layer would cost more than a small layer's update).  On a GPU it would need a sync.
      const int32_t* p = o.const_data_ptr<int32_t>();
      int64_t lo = 0, hi = 0;
      for (int64_t i = 0; i < o.numel(); ++i) {
        const int64_t e = signed_offsets ? entry_of(p[i]) : p[i];  // a signed table's entries (orbit_math.h)
        lo = e < lo ? e : lo;
        hi = e > hi ? e : hi;
      }
      const int64_t last_base = (c_out - 1) * stride_out + (c_in - 1) * stride_in;
      TORCH_CHECK(lo >= 0 && last_base + hi < t.numel(), name, ": offsets in [", lo, ", ", hi,
                  "] reach outside the tensor (", t.numel(), " entries)");
    }
    LayerDesc d{};
    d.out = t.data_ptr();
    d.weight = weights ? w.const_data_ptr() : d.out;
    d.offsets = o.const_data_ptr<int32_t>();
    d.coef_dev = coef_dev[l];
    d.coef_mean = coef_mean[l];
    d.c_in = c_in;
    d.stride_out = stride_out;
    d.stride_in = stride_in;
    d.orbits_per_block = o.size(0);
    d.n_orbits = o.size(0) * c_out * c_in;
    d.G = static_cast<int32_t>(G);
    d.dtype = code;
    d.signed_offsets = signed_offsets ? 1 : 0;
    a.layers.push_back(d);
  }
  return a;
}

}  // namespace decay
}  // namespace projkernels
