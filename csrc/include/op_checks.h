// Argument validation shared by the CPU and CUDA implementations of the projkernels_C ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <vector>

#include "layer_desc.h"
#include "orbit_math.h"

namespace projkernels {

// The orbit table in the form the kernels read it (see projkernels/orbits.py, OrbitTable.device_tables).
struct OrbitArgs {
  at::Tensor offsets;   // [orbits per block, G] int32, contiguous
  at::Tensor inv_stab;  // [orbits per block] float64, contiguous
  int64_t G = 0;
  int64_t orbits_per_block = 0;
  int64_t c_out = 0, c_in = 0, stride_out = 0, stride_in = 0;
  bool signed_offsets = false;  // negative offsets read -W[base + ~o] (orbit_math.h, entry_of)
  int64_t n_orbits() const { return orbits_per_block * c_out * c_in; }
};

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The descriptor's dtype code (layer_desc.h) of a weight's dtype; -1 for a dtype the kernels lack.
inline int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return -1;
  }
}

inline void check_weight(const at::Tensor& weight, const char* op) {
  TORCH_CHECK(weight.defined(), op, ": weight is undefined");
  const auto t = weight.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": weight must be float16, bfloat16, float32 or float64, got ", t);
}

inline void check_same_device(const at::Tensor& weight, const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device() == weight.device(), op, ": ", name, " is on ", t.device(), " but weight is on ",
              weight.device(), "; pass the orbit table moved to the weight's device (OrbitTable.device_tables)");
}

inline OrbitArgs check_table(const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& inv_stab,
                             int64_t c_out, int64_t c_in, int64_t stride_out, int64_t stride_in, bool signed_offsets,
                             const char* op) {
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.dim() == 2, op,
              ": offsets must be a 2-D int32 tensor [orbits per block, |G|], got ", offsets.scalar_type(),
              " of shape ", offsets.sizes());
  const int64_t G = offsets.size(1);
  TORCH_CHECK(G >= 1 && G <= kMaxGroupOrder, op, ": the group order (offsets.size(1)) must be in [1, ",
              kMaxGroupOrder, "], got ", G);
  TORCH_CHECK(offsets.size(0) >= 1, op, ": offsets lists no orbits");
  TORCH_CHECK(inv_stab.scalar_type() == at::kDouble && inv_stab.dim() == 1 && inv_stab.size(0) == offsets.size(0),
              op, ": inv_stab must be float64 of shape [", offsets.size(0), "], got ", inv_stab.scalar_type(),
              " of shape ", inv_stab.sizes());
  TORCH_CHECK(c_out >= 1 && c_in >= 1, op, ": c_out and c_in must be positive, got ", c_out, ", ", c_in);
  TORCH_CHECK(stride_out >= 0 && stride_in >= 0, op, ": strides must be non-negative, got ", stride_out, ", ",
              stride_in);
  TORCH_CHECK(weight.numel() == c_out * stride_out, op, ": weight has ", weight.numel(),
              " entries but the table describes c_out * stride_out = ", c_out, " * ", stride_out, " = ",
              c_out * stride_out);
  check_same_device(weight, offsets, "offsets", op);
  check_same_device(weight, inv_stab, "inv_stab", op);

  OrbitArgs a;
  a.offsets = offsets.contiguous();
  a.inv_stab = inv_stab.contiguous();
  a.G = G;
  a.orbits_per_block = offsets.size(0);
  a.c_out = c_out;
  a.c_in = c_in;
  a.stride_out = stride_out;
  a.stride_in = stride_in;
  a.signed_offsets = signed_offsets;

  if (weight.device().is_cpu()) {
    // One field block's offsets (|G| per orbit of one block, not per weight entry) read straight
    // from memory: no ops are dispatched and nothing is copied.  Device tables are checked once,
    // where projkernels/orbits.py builds them, since reading them here would sync with the device.
    // A signed table's negative offsets name entry ~o (orbit_math.h): the bounds are on the entries.
    const int32_t* p = a.offsets.const_data_ptr<int32_t>();
    const int64_t count = a.offsets.numel();
    const auto entry = [&](int32_t o) -> int64_t { return signed_offsets ? entry_of(o) : o; };
    int64_t lo = entry(p[0]), hi = entry(p[0]);
    for (int64_t i = 1; i < count; ++i) {
      lo = std::min<int64_t>(lo, entry(p[i]));
      hi = std::max<int64_t>(hi, entry(p[i]));
    }
    const int64_t last_base = (c_out - 1) * stride_out + (c_in - 1) * stride_in;
    TORCH_CHECK(lo >= 0 && last_base + hi < weight.numel(), op, ": offsets in [", lo, ", ", hi,
                "] reach outside the weight (", weight.numel(), " entries)",
                lo < 0 ? "; a table with negative offsets needs signed_offsets=True" : "");
  }
  return a;
}

inline void check_spectral(const at::Tensor& weight, const at::Tensor& basis, const at::Tensor& row_irrep,
                           int64_t G, int64_t n_irreps, const char* op) {
  TORCH_CHECK(basis.scalar_type() == at::kDouble && basis.dim() == 2 && basis.size(0) == G && basis.size(1) == G,
              op, ": basis must be float64 of shape [", G, ", ", G, "], got ", basis.scalar_type(), " of shape ",
              basis.sizes());
  TORCH_CHECK(row_irrep.scalar_type() == at::kLong && row_irrep.dim() == 1 && row_irrep.size(0) == G, op,
              ": row_irrep must be int64 of shape [", G, "], got ", row_irrep.scalar_type(), " of shape ",
              row_irrep.sizes());
  TORCH_CHECK(n_irreps >= 1 && n_irreps <= G, op, ": n_irreps must be in [1, ", G, "], got ", n_irreps);
  check_same_device(weight, basis, "basis", op);
  check_same_device(weight, row_irrep, "row_irrep", op);
  if (weight.device().is_cpu()) {
    // |G| values read in place (see check_table); device tables are checked where they are built.
    const at::Tensor r = row_irrep.contiguous();
    const int64_t* p = r.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < G; ++i)
      TORCH_CHECK(p[i] >= 0 && p[i] < n_irreps, op, ": row_irrep values must lie in [0, ", n_irreps, ")");
  }
}

inline void check_grad(const at::Tensor& weight, const at::Tensor& g, const char* name, const char* op) {
  TORCH_CHECK(g.numel() == 1, op, ": ", name, " must hold one value (a 0-dim tensor), got shape ", g.sizes());
  TORCH_CHECK(g.is_floating_point(), op, ": ", name, " must be a floating tensor, got ", g.scalar_type());
  check_same_device(weight, g, name, op);
}

// The validated arguments of a multi-tensor op (the penalty's, the decay's): per-layer descriptors
// (chunk ranges not yet set) over contiguous tensors that `keep` holds alive for as long as the
// descriptors are used (the decay's tensors are the caller's own, already contiguous).
struct LayerArgs {
  std::vector<at::Tensor> keep;
  std::vector<LayerDesc> layers;
  at::ScalarType dtype = at::kFloat;
  c10::Device device{at::kCPU};
};

// Ints per layer in the multi-tensor ops' geometry: (c_out, c_in, stride_out, stride_in, signed_offsets).
constexpr int64_t kLayerGeometry = 5;

// The layer descriptor (layer_desc.h) of one validated weight, shared by the single-weight and
// multi-tensor penalty ops on both devices.  w: the contiguous weight the table describes; out: the
// storage of dW or P W (the gradient ops), or nullptr.
inline LayerDesc describe(const OrbitArgs& t, const at::Tensor& w, void* out) {
  LayerDesc d{};
  d.weight = w.const_data_ptr();
  d.out = out;
  d.offsets = t.offsets.const_data_ptr<int32_t>();
  d.inv_stab = t.inv_stab.const_data_ptr<double>();
  d.c_in = t.c_in;
  d.stride_out = t.stride_out;
  d.stride_in = t.stride_in;
  d.orbits_per_block = t.orbits_per_block;
  d.n_orbits = t.n_orbits();
  d.G = static_cast<int32_t>(t.G);
  d.dtype = dtype_code(w.scalar_type());
  d.signed_offsets = t.signed_offsets ? 1 : 0;
  return d;
}

// geometry lists (c_out, c_in, stride_out, stride_in, signed_offsets) for every layer, flattened.
inline LayerArgs check_multi(at::TensorList weights, at::TensorList offsets, at::TensorList inv_stab,
                             at::IntArrayRef geometry, const char* op) {
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L >= 1, op, ": weights is empty; pass at least one weight");
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == L && static_cast<int64_t>(inv_stab.size()) == L, op,
              ": expected one offsets and one inv_stab tensor per weight (", L, "), got ", offsets.size(), " and ",
              inv_stab.size());
  TORCH_CHECK(static_cast<int64_t>(geometry.size()) == kLayerGeometry * L, op,
              ": geometry must hold (c_out, c_in, stride_out, stride_in, signed_offsets) per weight, i.e. ",
              kLayerGeometry * L, " ints, got ", geometry.size());
  TORCH_CHECK(L <= INT32_MAX, op, ": too many weights (", L, ")");
  LayerArgs a;
  check_weight(weights[0], op);
  a.dtype = weights[0].scalar_type();
  a.device = weights[0].device();
  a.keep.reserve(3 * L);
  a.layers.reserve(L);
  for (int64_t l = 0; l < L; ++l) {
    // The layer's name goes into a message only when a check fails: no string is built per layer.
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.defined(), op, " (weights[", l, "]): weight is undefined");
    TORCH_CHECK(w.scalar_type() == a.dtype, op, " (weights[", l, "]): every weight of one call must have the dtype of ",
                "weights[0] (", a.dtype, "), got ", w.scalar_type(), "; call once per dtype");
    TORCH_CHECK(w.device() == a.device, op, " (weights[", l, "]): every weight of one call must be on weights[0]'s ",
                "device (", a.device, "), got ", w.device());
    const int64_t* g = geometry.data() + kLayerGeometry * l;
    OrbitArgs t;
    try {
      t = check_table(w, offsets[l], inv_stab[l], g[0], g[1], g[2], g[3], g[4] != 0, op);
    } catch (const c10::Error& e) {
      // Rewritten as "<op> (weights[l]): <reason>".
      std::string reason = e.msg();
      const std::string prefix = std::string(op) + ": ";
      if (reason.compare(0, prefix.size(), prefix) == 0) reason.erase(0, prefix.size());
      TORCH_CHECK(false, op, " (weights[", l, "]): ", reason);
    }
    a.keep.push_back(w.contiguous());
    a.keep.push_back(t.offsets);
    a.keep.push_back(t.inv_stab);
    a.layers.push_back(describe(t, a.keep[3 * l], nullptr));
  }
  return a;
}

// The backward's outputs: every layer's dW, contiguous, in the weights' dtype, and each layer's
// descriptor pointed at its output.  Each dW has its own storage (outputs of an op must not alias
// one another: torch.compile's fake kernels and tensor hooks rely on it).  On the CPU they are
// allocated without dispatching an op per layer.
inline std::vector<at::Tensor> multi_grad_outputs(LayerArgs& a) {
  const int64_t L = static_cast<int64_t>(a.layers.size());
  const bool cpu = a.device.is_cpu();
  std::vector<at::Tensor> out;
  out.reserve(L);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = a.keep[3 * l];
    out.push_back(cpu ? at::detail::empty_cpu(w.sizes(), a.dtype, /*pin_memory=*/false, std::nullopt)
                      : at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous)));
    a.layers[l].out = out.back().mutable_data_ptr();
  }
  return out;
}

inline void check_multi_grad(const LayerArgs& a, const at::Tensor& g, const char* name, const char* op) {
  const int64_t L = static_cast<int64_t>(a.layers.size());
  TORCH_CHECK(g.dim() == 1 && g.size(0) == L, op, ": ", name, " must have shape [", L, "] (one value per weight), got ",
              g.sizes());
  TORCH_CHECK(g.is_floating_point(), op, ": ", name, " must be a floating tensor, got ", g.scalar_type());
  TORCH_CHECK(g.device() == a.device, op, ": ", name, " is on ", g.device(), " but the weights are on ", a.device);
}

// --- the opening checks of each raw op, shared by its CPU and CUDA kernels ----------------------

inline OrbitArgs check_fused_forward(const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& inv_stab,
                                     const at::Tensor& basis, const at::Tensor& row_irrep, int64_t n_irreps,
                                     int64_t c_out, int64_t c_in, int64_t stride_out, int64_t stride_in,
                                     bool signed_offsets) {
  constexpr const char* op = "projkernels_C::fused_forward";
  check_weight(weight, op);
  const OrbitArgs t = check_table(weight, offsets, inv_stab, c_out, c_in, stride_out, stride_in, signed_offsets, op);
  check_spectral(weight, basis, row_irrep, t.G, n_irreps, op);
  return t;
}

inline OrbitArgs check_fused_backward(const at::Tensor& weight, const at::Tensor& grad_penalty,
                                      const at::Tensor& grad_eq, const at::Tensor& offsets, const at::Tensor& inv_stab,
                                      int64_t c_out, int64_t c_in, int64_t stride_out, int64_t stride_in,
                                      bool signed_offsets) {
  constexpr const char* op = "projkernels_C::fused_backward";
  check_weight(weight, op);
  check_grad(weight, grad_penalty, "grad_penalty", op);
  check_grad(weight, grad_eq, "grad_eq", op);
  return check_table(weight, offsets, inv_stab, c_out, c_in, stride_out, stride_in, signed_offsets, op);
}

inline LayerArgs check_multi_forward(at::TensorList weights, at::TensorList offsets, at::TensorList inv_stab,
                                     at::IntArrayRef geometry) {
  return check_multi(weights, offsets, inv_stab, geometry, "projkernels_C::multi_forward");
}

inline LayerArgs check_multi_backward(at::TensorList weights, const at::Tensor& grad_penalty, const at::Tensor& grad_eq,
                                      at::TensorList offsets, at::TensorList inv_stab, at::IntArrayRef geometry) {
  constexpr const char* op = "projkernels_C::multi_backward";
  LayerArgs a = check_multi(weights, offsets, inv_stab, geometry, op);
  check_multi_grad(a, grad_penalty, "grad_penalty", op);
  check_multi_grad(a, grad_eq, "grad_eq", op);
  return a;
}

}  // namespace projkernels
