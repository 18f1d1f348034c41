// Signed orbit tables at the CPU ops' entry (orbit_math.h: an offset o < 0 reads -W[base + ~o]).
//
// The shared argument checks (op_checks.h, decay_checks.h) bound every offset to [0, numel); a
// signed table is checked there through a copy holding entry_of of each offset (the entries it
// reads, so the same bounds hold), and the kernels then read the signed table itself.  Tables
// without a negative offset pass through untouched (no copy).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "op_checks.h"
#include "orbit_math.h"

namespace projkernels {
namespace cpu {

// True for a CPU int32 2-D table holding a negative offset (the only tables that are copied).
inline bool is_signed_table(const at::Tensor& o) {
  if (!o.defined() || !o.device().is_cpu() || o.scalar_type() != at::kInt || o.dim() != 2) return false;
  const at::Tensor c = o.contiguous();
  const int32_t* p = c.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < c.numel(); ++i)
    if (p[i] < 0) return true;
  return false;
}

// The table the argument checks see: entry_of(o) elementwise for a signed table, o itself otherwise.
inline at::Tensor entries_for_checks(const at::Tensor& o) {
  if (!is_signed_table(o)) return o;
  at::Tensor e = o.contiguous().clone();
  int32_t* p = e.mutable_data_ptr<int32_t>();
  for (int64_t i = 0; i < e.numel(); ++i) p[i] = entry_of(p[i]);
  return e;
}

inline std::vector<at::Tensor> entries_for_checks(at::TensorList offsets) {
  std::vector<at::Tensor> out;
  out.reserve(offsets.size());
  for (const at::Tensor& o : offsets) out.push_back(entries_for_checks(o));
  return out;
}

// After the checks: the kernels read the signed table.
inline void restore_signs(OrbitArgs& t, const at::Tensor& offsets) {
  if (is_signed_table(offsets)) t.offsets = offsets.contiguous();
}

// check_multi keeps each layer's table at keep[3 l + 1] and points its descriptor at it.
inline void restore_signs(LayerArgs& a, at::TensorList offsets) {
  for (size_t l = 0; l < offsets.size(); ++l) {
    if (!is_signed_table(offsets[l])) continue;
    a.keep[3 * l + 1] = offsets[l].contiguous();
    a.layers[l].offsets = a.keep[3 * l + 1].const_data_ptr<int32_t>();
  }
}

// The decay's descriptors point straight at the caller's tables (contiguous int32, checked).
inline void restore_signs_decay(std::vector<LayerDesc>& layers, at::TensorList offsets) {
  for (size_t l = 0; l < offsets.size(); ++l)
    if (is_signed_table(offsets[l])) layers[l].offsets = offsets[l].const_data_ptr<int32_t>();
}

}  // namespace cpu
}  // namespace projkernels
