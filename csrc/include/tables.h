// The single-weight ops' tables by name.  The schemas of these ops take a weight's description as
// two lists, `Tensor[] table` and `int[] geometry` (so that one op serves every configuration, and a
// bound call converts them once); this header is the one place that reads those lists by position.
// Every op converts them here once, at the schema boundary, and uses the names from then on.
//
//   finite group (penalty_energy, penalty_energy_backward, project, spectrum):
//     table    = [offsets, inv_stab, basis, row_irrep, zero, half]
//     geometry = [n_irreps, c_out, c_in, stride_out, stride_in, signed_offsets]
//     (signed_offsets: 1 when the table holds negative offsets, signed-permutation fields, orbit_math.h)
//   steerable (steerable_*): steerable_checks.h describes the entries
//     table    = [q, fields, desc, zero, half, qt]
//     geometry = [c_out, c_in, S, descriptor rows flattened]
//
// zero and half are 0-dim tensors of the accumulation dtype holding 0 and 1/2: the gradient
// coefficients of an unused output and of P(W) = backward(grad_pen = 0, grad_eq = 1/2), kept with the
// table so that no call has to create them.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace projkernels {

// A finite group's table: the orbit table of projkernels/orbits.py (OrbitTable.device_tables).
// The members refer to the call's lists, which outlive it.
struct OrbitTableRef {
  const at::Tensor& offsets;    // [orbits per block, |G|] int32
  const at::Tensor& inv_stab;   // [orbits per block] float64
  const at::Tensor& basis;      // [|G|, |G|] float64: the spectrum's real irrep basis
  const at::Tensor& row_irrep;  // [|G|] int64: the irrep of each basis row
  const at::Tensor& zero;       // 0-dim, accumulation dtype
  const at::Tensor& half;       // 0-dim, accumulation dtype
  int64_t n_irreps, c_out, c_in, stride_out, stride_in;
  int64_t signed_offsets;  // 1: the offsets hold negative entries (orbit_math.h, entry_of), else 0

  static constexpr size_t kTableSize = 6, kGeometrySize = 6;
};

inline OrbitTableRef orbit_table(at::TensorList table, at::IntArrayRef geometry, const char* op) {
  TORCH_CHECK(table.size() == OrbitTableRef::kTableSize, op,
              ": table must be [offsets, inv_stab, basis, row_irrep, zero, half], got ", table.size(), " tensors");
  TORCH_CHECK(geometry.size() == OrbitTableRef::kGeometrySize, op,
              ": geometry must be [n_irreps, c_out, c_in, stride_out, stride_in, signed_offsets], got ", geometry.size(),
              " ints");
  return {table[0],    table[1],    table[2],    table[3],    table[4],
          table[5],    geometry[0], geometry[1], geometry[2], geometry[3],
          geometry[4], geometry[5]};
}

// A steerable symmetry's layout (projkernels/symmetry/steerable.py); the contents are checked by
// check_steerable (steerable_checks.h).
struct SteerTableRef {
  const at::Tensor& q;       // every Q_t, row-major, concatenated; accumulation dtype
  const at::Tensor& fields;  // int64 field channel offsets
  const at::Tensor& desc;    // [T, kSteerDescWidth] int64 descriptor rows, for the device
  const at::Tensor& zero;    // 0-dim, accumulation dtype
  const at::Tensor& half;    // 0-dim, accumulation dtype
  const at::Tensor& qt;      // every Q_t transposed, same offsets
  int64_t c_out, c_in, S;
  at::IntArrayRef rows;      // the descriptor rows, flattened, for the host

  static constexpr size_t kTableSize = 6, kGeometryHead = 3;
  // The table's names in order, for messages.
  static constexpr const char* kNames[kTableSize] = {"q", "fields", "desc", "zero", "half", "qt"};
};

inline SteerTableRef steer_table(at::TensorList table, at::IntArrayRef geometry, const char* op) {
  TORCH_CHECK(table.size() == SteerTableRef::kTableSize, op,
              ": table must be [q, fields, desc, zero, half, qt], got ", table.size(), " tensors");
  TORCH_CHECK(geometry.size() >= SteerTableRef::kGeometryHead, op,
              ": geometry must be [c_out, c_in, S] followed by the block types' rows, got ", geometry.size(), " ints");
  return {table[0],    table[1],    table[2],    table[3],
          table[4],    table[5],    geometry[0], geometry[1],
          geometry[2], geometry.slice(SteerTableRef::kGeometryHead)};
}

}  // namespace projkernels
