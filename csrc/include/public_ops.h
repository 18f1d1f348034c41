// The public projkernels_C ops: what projkernels.api and projkernels.multi call for the compiled
// backends.  Each takes the device-resident tables that the Python side builds and validates once
// per configuration, and redispatches to the raw kernels (fused_forward, fused_backward,
// multi_forward, multi_backward), so the dispatcher picks the CPU or the CUDA kernel.
//
// Single weight:  table    = [offsets, inv_stab, basis, row_irrep, zero, half]
//                 geometry = [n_irreps, c_out, c_in, stride_out, stride_in]
// zero and half are 0-dim tensors of the accumulation dtype holding 0 and 1/2: the gradient
// coefficients of an unused output and of P(W) = backward(grad_pen = 0, grad_eq = 1/2), kept with the
// table so that no call has to create them.
//
// Multi-tensor:   offsets[l], inv_stab[l] per layer, consts = [2, L] (row 0 zeros, row 1 halves, in the
//                 accumulation dtype), geometry = (c_out, c_in, stride_out, stride_in) per layer.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace projkernels {
namespace public_ops {

constexpr int64_t kTableSize = 6;
constexpr int64_t kGeometrySize = 5;

// Calls through the dispatcher (the Autograd key first when grad mode records).
std::tuple<at::Tensor, at::Tensor> penalty_energy(const at::Tensor& weight, at::TensorList table,
                                                  at::IntArrayRef geometry);
at::Tensor penalty_energy_backward(const at::Tensor& weight, const at::Tensor& grad_penalty,
                                   const at::Tensor& grad_eq, at::TensorList table, at::IntArrayRef geometry);
at::Tensor project(const at::Tensor& weight, at::TensorList table, at::IntArrayRef geometry);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_penalty(at::TensorList weights,
                                                                         at::TensorList offsets,
                                                                         at::TensorList inv_stab,
                                                                         const at::Tensor& consts,
                                                                         at::IntArrayRef geometry);
std::vector<at::Tensor> multi_penalty_backward(at::TensorList weights, const at::Tensor& grad_penalty,
                                               const at::Tensor& grad_eq, at::TensorList offsets,
                                               at::TensorList inv_stab, const at::Tensor& consts,
                                               at::IntArrayRef geometry);

}  // namespace public_ops
}  // namespace projkernels
