// Calls of the public projkernels_C ops through the dispatcher (ops/public_ops.cpp): what the
// autograd (autograd/autograd.cpp) calls, so that the Autograd key comes first when grad mode
// records (double backward) and the device's kernel runs otherwise.
//
// Single weight: table and geometry as in the schemas, read by name in tables.h.
// Multi-tensor:  offsets[l], inv_stab[l] per layer, consts = [2, L] (row 0 zeros, row 1 halves, in the
//                accumulation dtype), geometry = (c_out, c_in, stride_out, stride_in) per layer.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace projkernels {
namespace public_ops {

// The single-weight ops of the finite groups ...
std::tuple<at::Tensor, at::Tensor> penalty_energy(const at::Tensor& weight, at::TensorList table,
                                                  at::IntArrayRef geometry);
at::Tensor penalty_energy_backward(const at::Tensor& weight, const at::Tensor& grad_penalty,
                                   const at::Tensor& grad_eq, at::TensorList table, at::IntArrayRef geometry);
at::Tensor project(const at::Tensor& weight, at::TensorList table, at::IntArrayRef geometry);
at::Tensor spectrum(const at::Tensor& weight, at::TensorList table, at::IntArrayRef geometry);

// ... and of the steerable symmetries (the same signatures).
std::tuple<at::Tensor, at::Tensor> steerable_penalty_energy(const at::Tensor& weight, at::TensorList table,
                                                            at::IntArrayRef geometry);
at::Tensor steerable_penalty_energy_backward(const at::Tensor& weight, const at::Tensor& grad_penalty,
                                             const at::Tensor& grad_eq, at::TensorList table,
                                             at::IntArrayRef geometry);
at::Tensor steerable_project(const at::Tensor& weight, at::TensorList table, at::IntArrayRef geometry);

// The multi-tensor ops.
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
