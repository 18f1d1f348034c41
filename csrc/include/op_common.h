// Small helpers shared by the translation units of the projkernels_C ops (cpu/, ops/, python/):
// reading a one-value tensor in place, and the typed handle of an op for calls through the
// dispatcher.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>


namespace projkernels {

// A one-value tensor's value, read in place (the CPU kernels' gradient coefficients): no .item(),
// which would dispatch an op.
inline double read_scalar(const at::Tensor& g) {
  double v = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "read_scalar",
                                  [&] { v = static_cast<double>(*g.const_data_ptr<scalar_t>()); });
  return v;
}

// The typed handle of an op of the library, for calls through the dispatcher (looked up once by
// the callers, which keep it in a function-local static).
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace projkernels
