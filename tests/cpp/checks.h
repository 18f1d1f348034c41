// The checks of the C++ unit tests: each failed check prints where and why and counts one failure;
// main returns the count.  One copy for every test file (each file has its own counter).
#pragma once

#include <cmath>
#include <cstdio>

static int failures = 0;

#define CHECK(cond)                                                             \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::printf("%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);      \
      ++failures;                                                               \
    }                                                                           \
  } while (0)

// |actual - expected| <= tol (1 + |expected|).
#define CHECK_CLOSE(actual, expected, tol)                                                      \
  do {                                                                                          \
    const double a_ = static_cast<double>(actual), e_ = static_cast<double>(expected);         \
    if (!(std::fabs(a_ - e_) <= (tol) * (1.0 + std::fabs(e_)))) {                              \
      std::printf("%s:%d: %s = %.17g, expected %.17g\n", __FILE__, __LINE__, #actual, a_, e_); \
      ++failures;                                                                               \
    }                                                                                           \
  } while (0)

// |actual - expected| <= rtol |expected|.
#define CHECK_REL(actual, expected, rtol)                                                               \
  do {                                                                                                  \
    const double a_ = static_cast<double>(actual), e_ = static_cast<double>(expected);                 \
    if (!(std::fabs(a_ - e_) <= (rtol) * std::fabs(e_))) {                                             \
      std::printf("%s:%d: %s = %.17g, expected %.17g (rtol %g)\n", __FILE__, __LINE__, #actual, a_, e_, \
                  static_cast<double>(rtol));                                                          \
      ++failures;                                                                                       \
    }                                                                                                   \
  } while (0)
