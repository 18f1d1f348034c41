// The one group-order switch of every kernel (CPU, CUDA single-weight, CUDA multi-tensor).
//
//   GROUP_ORDER_SWITCH(G, K, [&] { kernel<K>(...); });
//
// runs the lambda with `constexpr int K` set to the group-order class of G (orbit_math.h):
// the exact orders 1, 2, 4, 8, 16 (constant loop bounds: the orbit stays in registers on CUDA and
// the loops vectorise on CPU), -16 for the other orders up to 16, -kMaxArrayOrder up to that bound
// (an array in local memory), and 0 above it (the streamed class, any order).  Written as a macro
// around an immediately-called lambda, so the same text works in host code and inside a CUDA
// kernel (G uniform across the block: the branch never diverges).
#pragma once

#include "orbit_math.h"

#define GROUP_ORDER_SWITCH(G_, K_, ...)                                          \
  [&] {                                                                          \
    const int pk_order_ = static_cast<int>(G_);                                  \
    if (pk_order_ == 1) {                                                        \
      constexpr int K_ = 1;                                                      \
      return __VA_ARGS__();                                                      \
    } else if (pk_order_ == 2) {                                                 \
      constexpr int K_ = 2;                                                      \
      return __VA_ARGS__();                                                      \
    } else if (pk_order_ == 4) {                                                 \
      constexpr int K_ = 4;                                                      \
      return __VA_ARGS__();                                                      \
    } else if (pk_order_ == 8) {                                                 \
      constexpr int K_ = 8;                                                      \
      return __VA_ARGS__();                                                      \
    } else if (pk_order_ == 16) {                                                \
      constexpr int K_ = 16;                                                     \
      return __VA_ARGS__();                                                      \
    } else if (pk_order_ < 16) {                                                 \
      constexpr int K_ = -16;                                                    \
      return __VA_ARGS__();                                                      \
    } else if (pk_order_ <= ::projkernels::kMaxArrayOrder) {                     \
      constexpr int K_ = -::projkernels::kMaxArrayOrder;                         \
      return __VA_ARGS__();                                                      \
    } else {                                                                     \
      constexpr int K_ = 0;                                                      \
      return __VA_ARGS__();                                                      \
    }                                                                            \
  }()

// The class GROUP_ORDER_SWITCH picks for G, for tests and host-side planning.
namespace projkernels {
PK_HOST_DEVICE constexpr int group_order_class(int G) {
  return (G == 1 || G == 2 || G == 4 || G == 8 || G == 16) ? G : (G < 16 ? -16 : (G <= kMaxArrayOrder ? -kMaxArrayOrder : 0));
}
}  // namespace projkernels

// The offsets' element type of a table (orbit_math.h): runs the lambda with `using OFF_ = int32_t`
// for a table without negative offsets (the unsigned code, unchanged) or `SignedOffset` for one with
// (signed-permutation fields).  The flag comes from the table (OrbitTable.signed), never from its data.
#define SIGNED_SWITCH(SIGNED_, OFF_, ...)                                        \
  [&] {                                                                          \
    if (SIGNED_) {                                                               \
      using OFF_ = ::projkernels::SignedOffset;                                  \
      return __VA_ARGS__();                                                      \
    } else {                                                                     \
      using OFF_ = int32_t;                                                      \
      return __VA_ARGS__();                                                      \
    }                                                                            \
  }()
