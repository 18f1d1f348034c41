// Argument checks of the steerable ops, shared by the CPU (cpu/steerable_kernels.cpp) and CUDA
// (cuda/steerable_kernels.cu) kernels.  Cheap invariants only: dtypes, devices, sizes, and the
// descriptor rows read from `geometry` (host ints).  The layout's contents were built and checked
// once by projkernels/symmetry/steerable.py; device tensors are never read here (that would sync).
//
//   table    = [q, fields, desc, zero, half, qt]
//     q      1-D, the accumulation dtype: every Q_t ([m, r] row-major) concatenated: the CPU kernels' C
//     fields 1-D int64: per type its out-field channel offsets, then its in-field ones
//     desc   [T, kSteerDescWidth] int64: the descriptor rows (steerable_math.h), for the device
//     zero, half  0-dim, the accumulation dtype: 0 and 1/2 (project = backward(0, 1/2))
//     qt     like q, each Q_t transposed ([r, m] row-major, same offsets): the CPU kernels' P X and
//            both phases of the CUDA kernels (threads on consecutive e read consecutive addresses)
//   geometry = [c_out, c_in, S, desc rows flattened]: the same rows, for the host
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "op_checks.h"  // acc_type_of, check_weight
#include "steerable_math.h"
#include "tables.h"

namespace projkernels {

static_assert(SteerTableRef::kGeometryHead == kSteerGeometryHead, "one geometry head");

struct SteerArgs {
  std::vector<SteerType> types;
  int64_t c_out = 0, c_in = 0, S = 0;
  int64_t n_tiles = 0, max_m = 0, max_r = 0;
  at::Tensor q, fields, desc, qt;
  at::Tensor zero, half;  // 0-dim, the accumulation dtype: project = write(0, 1/2)
  const int64_t* desc_host = nullptr;  // geometry's descriptor rows
};

inline SteerArgs check_steerable(const at::Tensor& weight, at::TensorList table, at::IntArrayRef geometry,
                                 const char* op) {
  check_weight(weight, op);
  const SteerTableRef tab = steer_table(table, geometry, op);
  const int64_t rows = static_cast<int64_t>(tab.rows.size());
  TORCH_CHECK(rows > 0 && rows % kSteerDescWidth == 0, op, ": geometry must be [c_out, c_in, S] followed by ",
              kSteerDescWidth, " ints per block type, got ", geometry.size(), " ints");
  SteerArgs a;
  a.c_out = tab.c_out;
  a.c_in = tab.c_in;
  a.S = tab.S;
  TORCH_CHECK(a.c_out >= 1 && a.c_in >= 1 && a.S >= 1, op, ": c_out, c_in and S must be positive, got ", a.c_out,
              ", ", a.c_in, ", ", a.S);
  TORCH_CHECK(weight.numel() == a.c_out * a.c_in * a.S, op, ": weight has ", weight.numel(),
              " entries but the layout describes c_out * c_in * S = ", a.c_out, " * ", a.c_in, " * ", a.S);
  const auto acc = acc_type_of(weight.scalar_type());
  a.q = tab.q;
  a.fields = tab.fields;
  a.desc = tab.desc;
  a.qt = tab.qt;
  a.zero = tab.zero;
  a.half = tab.half;
  TORCH_CHECK(a.q.dim() == 1 && a.q.scalar_type() == acc && a.q.is_contiguous(), op,
              ": q must be a contiguous 1-D tensor of the accumulation dtype ", acc, ", got ", a.q.scalar_type(),
              " of shape ", a.q.sizes());
  TORCH_CHECK(a.qt.dim() == 1 && a.qt.scalar_type() == acc && a.qt.is_contiguous() && a.qt.numel() == a.q.numel(), op,
              ": qt must be a contiguous 1-D tensor of the accumulation dtype ", acc, " with q's ", a.q.numel(),
              " entries, got ", a.qt.scalar_type(), " of shape ", a.qt.sizes());
  TORCH_CHECK(a.fields.dim() == 1 && a.fields.scalar_type() == at::kLong && a.fields.is_contiguous(), op,
              ": fields must be a contiguous 1-D int64 tensor, got ", a.fields.scalar_type(), " of shape ",
              a.fields.sizes());
  const int64_t T = rows / kSteerDescWidth;
  TORCH_CHECK(a.desc.scalar_type() == at::kLong && a.desc.dim() == 2 && a.desc.size(0) == T &&
                  a.desc.size(1) == kSteerDescWidth && a.desc.is_contiguous(),
              op, ": desc must be a contiguous int64 tensor [", T, ", ", kSteerDescWidth, "], got ",
              a.desc.scalar_type(), " of shape ", a.desc.sizes());
  const at::Tensor* entries[] = {&tab.q, &tab.fields, &tab.desc, &tab.zero, &tab.half, &tab.qt};
  for (size_t i = 0; i < SteerTableRef::kTableSize; ++i) {
    TORCH_CHECK(entries[i]->device() == weight.device(), op, ": ", SteerTableRef::kNames[i], " is on ",
                entries[i]->device(), " but weight is on ", weight.device(),
                "; pass the symmetry's layout for the weight's device");
  }

  a.desc_host = tab.rows.data();
  a.types.reserve(T);
  int64_t blocks = 0, tiles = 0;
  for (int64_t t = 0; t < T; ++t) {
    const SteerType s = SteerType::from(a.desc_host + t * kSteerDescWidth);
    TORCH_CHECK(s.d_out >= 1 && s.d_in >= 1 && s.rank >= 0 && s.n_out >= 1 && s.n_in >= 1 && s.blocks_per_tile >= 1,
                op, ": block type ", t, " has a non-positive size");
    const int64_t m = s.m(a.S);
    TORCH_CHECK(s.rank <= m, op, ": block type ", t, " has rank ", s.rank, " above its block size ", m);
    TORCH_CHECK(s.q_offset >= 0 && s.q_offset + m * s.rank <= a.q.numel(), op, ": block type ", t,
                "'s Q_t lies outside q");
    TORCH_CHECK(s.fields_offset >= 0 && s.fields_offset + s.n_out + s.n_in <= a.fields.numel(), op,
                ": block type ", t, "'s fields lie outside fields");
    TORCH_CHECK(s.tile_begin == tiles, op, ": block type ", t, " starts at tile ", s.tile_begin, ", expected ", tiles);
    tiles += s.n_tiles();
    blocks += s.n_blocks() * s.d_out * s.d_in;
    a.max_m = std::max(a.max_m, m);
    a.max_r = std::max(a.max_r, s.rank);
    a.types.push_back(s);
  }
  // The blocks partition W: their channel pairs cover c_out x c_in exactly once (the count here,
  // the placement where the layout is built).
  TORCH_CHECK(blocks == a.c_out * a.c_in, op, ": the block types cover ", blocks, " channel pairs, expected ",
              a.c_out * a.c_in);
  a.n_tiles = tiles;
  if (weight.device().is_cpu()) {
    // Host memory: every field must fit its side (a wrong table would read out of bounds).
    const int64_t* f = a.fields.const_data_ptr<int64_t>();
    for (const SteerType& s : a.types) {
      for (int64_t k = 0; k < s.n_out; ++k)
        TORCH_CHECK(f[s.fields_offset + k] >= 0 && f[s.fields_offset + k] + s.d_out <= a.c_out, op,
                    ": an out field lies outside the weight's ", a.c_out, " output channels");
      for (int64_t k = 0; k < s.n_in; ++k)
        TORCH_CHECK(f[s.fields_offset + s.n_out + k] >= 0 && f[s.fields_offset + s.n_out + k] + s.d_in <= a.c_in, op,
                    ": an in field lies outside the weight's ", a.c_in, " input channels");
    }
  }
  return a;
}

inline SteerArgs check_steerable_backward(const at::Tensor& weight, const at::Tensor& grad_penalty,
                                          const at::Tensor& grad_eq, at::TensorList table, at::IntArrayRef geometry,
                                          const char* op) {
  SteerArgs a = check_steerable(weight, table, geometry, op);
  for (const auto& [g, name] : {std::pair<const at::Tensor&, const char*>{grad_penalty, "grad_penalty"},
                                 std::pair<const at::Tensor&, const char*>{grad_eq, "grad_eq"}}) {
    TORCH_CHECK(g.numel() == 1 && g.is_floating_point(), op, ": ", name,
                " must be a floating tensor holding one value, got ", g.scalar_type(), " of shape ", g.sizes());
    TORCH_CHECK(g.device() == weight.device(), op, ": ", name, " is on ", g.device(), " but weight is on ",
                weight.device());
  }
  return a;
}

}  // namespace projkernels
