// Unit tests of csrc/orbit_math.h on orbits with hand-computed results (no torch needed).
//
// A C4 orbit read in cycle order v = (1, 2, 3, 6): mean 3, deviations (-2, -1, 0, 3), penalty 14,
// energy 4 * 3^2 = 36 (14 + 36 = ||v||^2 = 50).  With the real C4 Fourier basis below, the
// frequency-1 rows give (-2/sqrt2)^2 + (-4/sqrt2)^2 = 10 and the frequency-2 row (-4/2)^2 = 4.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "orbit_math.h"
#include "checks.h"

namespace pk = projkernels;


// Rows: constant; frequency 1 (cos, sin); frequency 2.  Orthonormal.
static const double kC4Basis[16] = {
    0.5, 0.5, 0.5, 0.5,
    M_SQRT1_2, 0.0, -M_SQRT1_2, 0.0,
    0.0, M_SQRT1_2, 0.0, -M_SQRT1_2,
    0.5, -0.5, 0.5, -0.5,
};
static const int64_t kC4RowIrrep[4] = {0, 1, 1, 2};

template <int MAXG, typename scalar_t, typename acc_t>
void free_orbit(double tol) {
  const scalar_t w[6] = {9, 1, 2, 3, 6, 9};  // entries 1..4 form the orbit; 0 and 5 must be ignored
  const int32_t offsets[4] = {0, 1, 2, 3};
  acc_t f[MAXG];
  pk::load_orbit<MAXG>(w, /*base=*/1, offsets, 4, f);
  CHECK_CLOSE(f[3], 6, 0);
  const acc_t mean = pk::orbit_mean<MAXG>(f, 4);
  CHECK_CLOSE(mean, 3, tol);
  pk::subtract_mean<MAXG>(f, mean, 4);
  CHECK_CLOSE(f[0], -2, tol);
  CHECK_CLOSE(f[1], -1, tol);
  CHECK_CLOSE(f[2], 0, tol);
  CHECK_CLOSE(f[3], 3, tol);
  CHECK_CLOSE(pk::penalty_part<MAXG>(f, acc_t(1), 4), 14, tol);
  CHECK_CLOSE(pk::energy_part(mean, acc_t(1), 4), 36, tol);

  CHECK_CLOSE(pk::row_coefficient<MAXG>(kC4Basis + 4, f, 4), -std::sqrt(2.0), tol);
  acc_t rows[MAXG] = {};
  pk::accumulate_row_energies<MAXG>(kC4Basis, f, acc_t(1), 4, rows);
  CHECK_CLOSE(rows[0], 0, 0);  // the constant row is not a deviation row
  CHECK_CLOSE(rows[1], 2, tol);
  CHECK_CLOSE(rows[2], 8, tol);
  CHECK_CLOSE(rows[3], 4, tol);
  double spectrum[3] = {0, 0, 0};
  pk::rows_to_irreps(rows, pk::energy_part(mean, acc_t(1), 4), kC4RowIrrep, 4, spectrum);
  CHECK_CLOSE(spectrum[0], 36, tol);
  CHECK_CLOSE(spectrum[1], 10, tol);
  CHECK_CLOSE(spectrum[2], 4, tol);
  CHECK_CLOSE(spectrum[0] + spectrum[1] + spectrum[2], 50, tol);

  // dW = 2 g_pen dev + 2 g_eq mean with g_pen = 0.5, g_eq = 0.25; P(W) is g_pen = 0, g_eq = 0.5.
  CHECK_CLOSE(pk::gradient_value(f[0], mean, acc_t(1), acc_t(0.5)), -0.5, tol);
  CHECK_CLOSE(pk::gradient_value(f[3], mean, acc_t(0), acc_t(1)), 3, tol);
}

// An orbit of size 2 under C4 (stabiliser of order 2): each entry appears twice in the |G| list
// and inv_stab = 1/2 undoes the repetition.  Entries 1 and 5: penalty (1-3)^2 + (5-3)^2 = 8,
// energy 2 * 3^2 = 18, and all of the penalty sits in the frequency-2 irrep.
template <typename acc_t>
void orbit_with_stabiliser(double tol) {
  const double w[2] = {1, 5};
  const int32_t offsets[4] = {0, 1, 0, 1};
  acc_t f[pk::kMaxArrayOrder];
  pk::load_orbit<pk::kMaxArrayOrder>(w, 0, offsets, 4, f);
  const acc_t mean = pk::orbit_mean<pk::kMaxArrayOrder>(f, 4);
  pk::subtract_mean<pk::kMaxArrayOrder>(f, mean, 4);
  const acc_t inv_stab = acc_t(0.5);
  CHECK_CLOSE(pk::penalty_part<pk::kMaxArrayOrder>(f, inv_stab, 4), 8, tol);
  CHECK_CLOSE(pk::energy_part(mean, inv_stab, 4), 18, tol);
  acc_t rows[pk::kMaxArrayOrder] = {};
  pk::accumulate_row_energies<pk::kMaxArrayOrder>(kC4Basis, f, inv_stab, 4, rows);
  double spectrum[3] = {0, 0, 0};
  pk::rows_to_irreps(rows, pk::energy_part(mean, inv_stab, 4), kC4RowIrrep, 4, spectrum);
  CHECK_CLOSE(spectrum[0], 18, tol);
  CHECK_CLOSE(spectrum[1], 0, tol);
  CHECK_CLOSE(spectrum[2], 8, tol);
}

// A nearly constant orbit in float32: the penalty comes from the deviations, so it keeps its
// relative accuracy where ||f||^2 - |G| mean^2 would lose it to cancellation.
void nearly_equivariant_float() {
  const float w[4] = {1.0f, 1.001f, 1.0f, 0.999f};
  const int32_t offsets[4] = {0, 1, 2, 3};
  float f[4];
  pk::load_orbit<4>(w, 0, offsets, 4, f);
  const float mean = pk::orbit_mean<4>(f, 4);
  pk::subtract_mean<4>(f, mean, 4);
  // Exact value for the float-rounded inputs, in double.
  const double v[4] = {1.0f, 1.001f, 1.0f, 0.999f};
  const double m = (v[0] + v[1] + v[2] + v[3]) / 4;
  double exact = 0;
  for (double x : v) exact += (x - m) * (x - m);
  CHECK_REL(pk::penalty_part<4>(f, 1.0f, 4), exact, 1e-3);
  // The cancelling form is off by far more than that in float32.
  float naive = 0;
  for (float x : w) naive += x * x;
  naive -= 4 * mean * mean;
  if (!(std::fabs(naive - exact) > 1e-2 * exact)) {
    std::printf("expected the cancelling form to be inaccurate (got %g vs %g)\n", naive, exact);
    ++failures;
  }
}

// The trivial group: one-element orbits have no deviation; energy is the square of the entry.
void trivial_group() {
  const double w[1] = {-2.5};
  const int32_t offsets[1] = {0};
  double f[1];
  pk::load_orbit<1>(w, 0, offsets, 1, f);
  const double mean = pk::orbit_mean<1>(f, 1);
  pk::subtract_mean<1>(f, mean, 1);
  CHECK_CLOSE(pk::penalty_part<1>(f, 1.0, 1), 0, 0);
  CHECK_CLOSE(pk::energy_part(mean, 1.0, 1), 6.25, 0);
}

// A signed orbit (a C4 vector field's entry under quarter turns: u -> v -> -u -> -v): entries 1 and 2
// of w = (9, 1, 2, 9), read as f = (+w1, +w2, -w1, -w2) = (1, 2, -1, -2) by the offsets (0, 1, ~0, ~1).
// mean 0, so P(W) = 0 there, the penalty is inv_stab * sum f^2 = 1/2 * 10 = 5 = w1^2 + w2^2, and the
// gradient stored at each entry is s * 2 g_pen (f - mean) = 2 g_pen W (each entry written twice, with
// the same value).  An orbit read with both signs of one entry (offsets (0, ~0)) has mean 0 too.
template <int MAXG>
void signed_orbit() {
  const double w[4] = {9, 1, 2, 9};
  const pk::SignedOffset offsets[4] = {{0}, {1}, {~0}, {~1}};
  double f[MAXG];
  pk::load_orbit<MAXG>(w, /*base=*/1, offsets, 4, f);
  CHECK_CLOSE(f[2], -1, 0);
  CHECK_CLOSE(f[3], -2, 0);
  const pk::OrbitEnergy<double> e = pk::orbit_energy<MAXG == 4 ? 4 : 0, false, double, double>(w, 1, offsets, 4, 0.5);
  CHECK_CLOSE(e.pen, 5, 1e-15);
  CHECK_CLOSE(e.eq, 0, 0);
  double out[4] = {7, 7, 7, 7};
  pk::write_orbit_gradient<MAXG == 4 ? 4 : 0>(w, out, 1, offsets, 4, /*two_grad_pen=*/2.0, /*two_grad_eq=*/2.0);
  CHECK_CLOSE(out[0], 7, 0);  // outside the orbit: untouched
  CHECK_CLOSE(out[1], 2, 1e-15);
  CHECK_CLOSE(out[2], 4, 1e-15);
  CHECK_CLOSE(out[3], 7, 0);
  // The unsigned encoding of the same four offsets would read 9 (entry ~0 = -1 is outside): the
  // signed table must only ever be read as SignedOffset.
  CHECK_CLOSE(pk::entry_of(~1), 1, 0);
  CHECK_CLOSE(pk::negated(~0) ? 1 : 0, 1, 0);
  const pk::SignedOffset both[2] = {{0}, {~0}};
  CHECK_CLOSE((pk::streamed_mean<double>(w + 1, 0, both, 2)), 0, 0);
}

int main() {
  signed_orbit<4>();
  signed_orbit<pk::kMaxArrayOrder>();
  free_orbit<4, double, double>(1e-14);
  free_orbit<pk::kMaxArrayOrder, double, double>(1e-14);
  free_orbit<16, float, float>(1e-6);
  free_orbit<pk::kMaxArrayOrder, float, double>(1e-14);
  orbit_with_stabiliser<double>(1e-14);
  orbit_with_stabiliser<float>(1e-6);
  nearly_equivariant_float();
  trivial_group();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("orbit_math: all checks passed\n");
  return EXIT_SUCCESS;
}
