// The schemas of every projkernels_C op, in one place: what each op takes and returns.  The kernels
// are registered elsewhere, per dispatch key: CPU (cpu/), CUDA (cuda/), the public ops' thin
// kernels for both devices (ops/public_ops.cpp), Autograd (autograd/autograd.cpp); fake kernels for
// torch.compile are registered from Python (projkernels/library/fakes.py).
//
// Accumulation dtype: float64 for float64 weights, float32 otherwise (acc_type_of, op_checks.h).
#include <torch/library.h>

namespace projkernels {
namespace {

// Whether this build carries the CUDA kernels (PROJKERNELS_WITH_CUDA at compile time).
bool cuda_enabled() {
#ifdef PROJKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace projkernels

TORCH_LIBRARY(projkernels_C, m) {
  m.set_python_module("projkernels.library.fakes");

  // --- raw kernels (cpu/orbit_kernels.cpp, cuda/orbit_kernels.cu, cuda/multi_kernels.cu) ----------
  // fused_forward reads every weight entry once and returns (penalty, eq_energy, spectrum); the
  // spectrum needs |G| dot products of length |G| per orbit, so training calls skip it with
  // with_spectrum=False (the third output is then zeros).  fused_backward reads W once and writes dW
  // once.  Both take the orbit table of projkernels/orbits.py (OrbitTable.device_tables);
  // signed_offsets (1 / 0, the last entry of OrbitTable.geometry) says that it holds negative offsets
  // (signed-permutation fields, orbit_math.h).
  m.def(
      "fused_forward(Tensor weight, Tensor offsets, Tensor inv_stab, Tensor basis, Tensor row_irrep, "
      "int n_irreps, int c_out, int c_in, int stride_out, int stride_in, int signed_offsets=0, "
      "bool with_spectrum=True) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_backward(Tensor weight, Tensor grad_penalty, Tensor grad_eq, Tensor offsets, Tensor inv_stab, "
      "int c_out, int c_in, int stride_out, int stride_in, int signed_offsets=0) -> Tensor");
  // Whole-model ops over L weights of one dtype on one device (multi_math.h): per-layer penalty and
  // eq_energy [L] in the accumulation dtype, and every layer's dW.  geometry holds (c_out, c_in,
  // stride_out, stride_in, signed_offsets) per weight; grad_penalty and grad_eq hold one value per weight.
  m.def("multi_forward(Tensor[] weights, Tensor[] offsets, Tensor[] inv_stab, int[] geometry) -> (Tensor, Tensor)");
  m.def(
      "multi_backward(Tensor[] weights, Tensor grad_penalty, Tensor grad_eq, Tensor[] offsets, Tensor[] inv_stab, "
      "int[] geometry) -> Tensor[]");
  // Whether this build carries the CUDA kernels.
  m.def("cuda_enabled() -> bool", &projkernels::cuda_enabled);

  // --- public ops (ops/public_ops.cpp; autograd in autograd/autograd.cpp) -------------------------
  // table = [offsets, inv_stab, basis, row_irrep, zero, half], geometry = [n_irreps, c_out, c_in,
  // stride_out, stride_in, signed_offsets] (read by name in tables.h).
  // (penalty, eq_energy), 0-dim, in the accumulation dtype.
  m.def("penalty_energy(Tensor weight, Tensor[] table, int[] geometry) -> (Tensor, Tensor)");
  // 2 grad_penalty (W - P W) + 2 grad_eq P W in the weight's dtype; grad_* are 0-dim.
  m.def(
      "penalty_energy_backward(Tensor weight, Tensor grad_penalty, Tensor grad_eq, Tensor[] table, int[] geometry) "
      "-> Tensor");
  // P(W) in the weight's dtype.
  m.def("project(Tensor weight, Tensor[] table, int[] geometry) -> Tensor");
  // Isotypic energies [n_irreps] in the accumulation dtype; not differentiable.
  m.def("spectrum(Tensor weight, Tensor[] table, int[] geometry) -> Tensor");
  // (total penalty, total eq_energy, per-layer penalty [L], per-layer eq_energy [L]) of weights of one dtype.
  m.def(
      "multi_penalty(Tensor[] weights, Tensor[] offsets, Tensor[] inv_stab, Tensor consts, int[] geometry) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Every layer's 2 grad_penalty[l] (W_l - P W_l) + 2 grad_eq[l] P W_l, in the weights' dtype.
  m.def(
      "multi_penalty_backward(Tensor[] weights, Tensor grad_penalty, Tensor grad_eq, Tensor[] offsets, "
      "Tensor[] inv_stab, Tensor consts, int[] geometry) -> Tensor[]");

  // --- steerable ops (cpu/steerable_kernels.cpp, cuda/steerable_kernels.cu) ------------------------
  // table = [q, fields, desc, zero, half, qt], geometry = [c_out, c_in, S, descriptor rows]
  // (steerable_checks.h); built once per device and dtype by projkernels/symmetry/steerable.py.
  m.def("steerable_penalty_energy(Tensor weight, Tensor[] table, int[] geometry) -> (Tensor, Tensor)");
  m.def(
      "steerable_penalty_energy_backward(Tensor weight, Tensor grad_penalty, Tensor grad_eq, Tensor[] table, "
      "int[] geometry) -> Tensor");
  m.def("steerable_project(Tensor weight, Tensor[] table, int[] geometry) -> Tensor");

  // --- equivariance decay (cpu/decay_kernels.cpp, cuda/decay_kernels.cu) ---------------------------
  //   multi_decay_:      W_l    <- W_l    + coef_dev[l] (W_l - P W_l) + coef_mean[l] P W_l, in place
  //   multi_decay_grad_: grad_l <- grad_l + coef_dev[l] (W_l - P W_l) + coef_mean[l] P W_l, in place
  m.def(
      "multi_decay_(Tensor(a!)[] weights, Tensor[] offsets, int[] geometry, float[] coef_dev, float[] coef_mean) "
      "-> ()");
  m.def(
      "multi_decay_grad_(Tensor(a!)[] grads, Tensor[] weights, Tensor[] offsets, int[] geometry, float[] coef_dev, "
      "float[] coef_mean) -> ()");
}
