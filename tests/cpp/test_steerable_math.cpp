// Unit tests of csrc/steerable_math.h's addressing and of the CUDA kernels' staging rule (no torch
// needed): the 32-bit element offsets and block bases against the (out channel, in channel, kernel
// position) formula, P X read from Q_t^T against Q_t, the shared-memory staging and the global
// coefficient scratch against hand-computed sizes, and a walk over every tile of a layout that
// reaches each element of W exactly once.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "checks.h"
#include "steerable_math.h"

namespace pk = projkernels;

// Element e of a block in the (p, q, k) form: p = out channel, q = in channel, k = kernel position.
static int64_t elem_offset_pqk(int64_t e, int64_t d_in, int64_t c_in, int64_t S) {
  const int64_t k = e % S, pq = e / S;
  return ((pq / d_in) * c_in + pq % d_in) * S + k;
}

static void elem_offsets() {
  const int64_t shapes[][4] = {{1, 1, 1, 1}, {2, 3, 7, 9}, {5, 5, 5, 125}, {3, 1, 4, 1}, {1, 4, 4, 25}};
  for (const auto& sh : shapes) {
    const int64_t d_out = sh[0], d_in = sh[1], c_in = sh[2], S = sh[3];
    for (int64_t e = 0; e < d_out * d_in * S; ++e)
      CHECK(pk::steer_elem_offset(static_cast<int>(e), static_cast<int>(d_in * S), c_in * S) ==
            elem_offset_pqk(e, d_in, c_in, S));
  }
}

// One type of 2 x 3 fields of sizes d_out = 2, d_in = 1, placed unevenly in c_out = 7, c_in = 5.
static void block_bases() {
  const int64_t fields[] = {0, 4, 1, 2, 4};  // out fields at channels 0, 4; in fields at 1, 2, 4
  const int64_t row[pk::kSteerDescWidth] = {2, 1, 3, 2, 3, 0, 0, 4, 0};
  const pk::SteerType t = pk::SteerType::from(row);
  const int64_t c_in = 5, S = 9;
  for (int b = 0; b < 6; ++b) {
    const int64_t expected = (fields[b / 3] * c_in + fields[2 + b % 3]) * S;
    CHECK(pk::steer_block_base(t, fields, b, c_in, S) == expected);
    CHECK(pk::steer_block_base(t, fields, static_cast<int64_t>(b), c_in, S) == expected);
  }
}

// P X from Q_t^T ([r, m]) equals sum_j C_j Q_t[e, j] from Q_t ([m, r]).
static void projected_from_the_transpose() {
  const int m = 5, r = 3;
  double q[m * r], qt[r * m];
  for (int e = 0; e < m; ++e)
    for (int j = 0; j < r; ++j) q[e * r + j] = qt[j * m + e] = 0.25 * e - 0.5 * j + 0.125 * e * j;
  const double c[r] = {1.5, -2.0, 0.25};
  for (int e = 0; e < m; ++e) {
    double px = 0;
    for (int j = 0; j < r; ++j) px += c[j] * q[e * r + j];
    CHECK_CLOSE(pk::steer_projected(c, qt + e, m, r), px, 0);
  }
}

// Hand-computed staging: 4 blocks per tile of m = 10, r = 3 (c = 12, q = 30, x = 40).
static void staging() {
  const int64_t S = 5;
  const int64_t row[pk::kSteerDescWidth] = {2, 1, 3, 2, 4, 0, 0, 4, 0};  // m = 2 * 1 * 5 = 10, 8 blocks
  const pk::SteerType t = pk::SteerType::from(row);
  pk::SteerStaging s = pk::steer_staging(t, S, 100);  // all three
  CHECK(s.c_shared && s.c == 12 && s.q == 30 && s.x == 40 && s.elems() == 82);
  s = pk::steer_staging(t, S, 50);  // C and Q_t^T; X next to them would need 82
  CHECK(s.c_shared && s.c == 12 && s.q == 30 && s.x == 0);
  s = pk::steer_staging(t, S, 45);  // C and Q_t^T, no room for X
  CHECK(s.c_shared && s.c == 12 && s.q == 30 && s.x == 0);
  s = pk::steer_staging(t, S, 41);  // C only: Q_t^T (42) and X (52) do not fit next to it
  CHECK(s.c_shared && s.c == 12 && s.q == 0 && s.x == 0 && s.elems() == 12);
  s = pk::steer_staging(t, S, 11);  // coefficients above the budget: global scratch, the rest global
  CHECK(!s.c_shared && s.c == 0 && s.q == 0 && s.x == 0 && s.elems() == 0);
  // Q_t^T does not fit next to C but X does: one block per tile, m = 10, r = 8 (c = 8, q = 80, x = 10).
  const int64_t tall[pk::kSteerDescWidth] = {2, 1, 8, 2, 4, 0, 0, 1, 0};
  s = pk::steer_staging(pk::SteerType::from(tall), S, 30);
  CHECK(s.c_shared && s.c == 8 && s.q == 0 && s.x == 10 && s.elems() == 18);
  // A type with fewer blocks than blocks_per_tile is sized by its blocks: 2 blocks, c = 6, x = 20.
  const int64_t few[pk::kSteerDescWidth] = {2, 1, 3, 1, 2, 0, 0, 4, 0};
  s = pk::steer_staging(pk::SteerType::from(few), S, 56);
  CHECK(s.c_shared && s.c == 6 && s.q == 30 && s.x == 20 && s.elems() == 56);
  // Rank 0: nothing to stage but X.
  const int64_t rank0[pk::kSteerDescWidth] = {2, 1, 0, 2, 4, 0, 0, 4, 0};
  s = pk::steer_staging(pk::SteerType::from(rank0), S, 40);
  CHECK(s.c_shared && s.c == 0 && s.q == 0 && s.x == 40);
}

// Four types: the first and third keep their coefficients in shared memory, the second and fourth
// (one block per tile, rank 7 above a budget of 6) do not: the scratch holds theirs back to back.
static void scratch_offsets() {
  const int64_t S = 2;
  const int64_t desc[4 * pk::kSteerDescWidth] = {
      1, 1, 1, 2, 2, 0, 0, 2, 0,   // m = 2, 4 blocks, c = 2
      2, 2, 7, 1, 3, 0, 0, 1, 2,   // m = 8, 3 blocks, rank 7: 21 in the scratch
      1, 1, 2, 1, 1, 0, 0, 1, 5,   // m = 2, c = 2
      2, 2, 7, 2, 1, 0, 0, 1, 6,   // m = 8, 2 blocks, rank 7: 14 in the scratch
  };
  const int64_t budget = 6;
  CHECK(pk::steer_scratch_offset(desc, 0, S, budget) == 0);
  CHECK(pk::steer_scratch_offset(desc, 1, S, budget) == 0);
  CHECK(pk::steer_scratch_offset(desc, 2, S, budget) == 21);
  CHECK(pk::steer_scratch_offset(desc, 3, S, budget) == 21);
  CHECK(pk::steer_scratch_offset(desc, 4, S, budget) == 35);  // the buffer's size
}

// Every tile's (block, element) pairs, addressed as the CUDA kernels address them (32-bit in-tile
// indices, steer_block_base + steer_elem_offset), reach every element of W exactly once.
static void tiles_cover_w_once() {
  // W [7, 6, 3]: out fields of sizes 2, 1, 2, 2 at 0, 2, 3, 5; in fields of sizes 3, 1, 2 at 0, 3, 4.
  const int64_t c_out = 7, c_in = 6, S = 3;
  const std::vector<int64_t> fields = {0, 3, 5, 0,      // (2, 3): out 0, 3, 5; in 0
                                       0, 3, 5, 4,      // (2, 2): out 0, 3, 5; in 4
                                       0, 3, 5, 3,      // (2, 1)
                                       2, 0,            // (1, 3)
                                       2, 4,            // (1, 2)
                                       2, 3};           // (1, 1)
  const int64_t desc[6 * pk::kSteerDescWidth] = {
      2, 3, 1, 3, 1, 0, 0, 2, 0,    // 3 blocks, 2 per tile: tiles 0, 1
      2, 2, 1, 3, 1, 0, 4, 1, 2,    // 3 blocks, 1 per tile: tiles 2, 3, 4
      2, 1, 1, 3, 1, 0, 8, 4, 5,    // 3 blocks, 4 per tile: tile 5
      1, 3, 1, 1, 1, 0, 12, 1, 6,   // tile 6
      1, 2, 1, 1, 1, 0, 14, 1, 7,   // tile 7
      1, 1, 1, 1, 1, 0, 16, 1, 8,   // tile 8
  };
  std::vector<int> hits(c_out * c_in * S, 0);
  for (int64_t tile = 0; tile < 9; ++tile) {
    const pk::SteerType t = pk::SteerType::from(desc + pk::steer_type_of_tile(desc, 6, tile) * pk::kSteerDescWidth);
    const pk::SteerTile bl = pk::steer_tile_blocks(t, tile);
    const int first = static_cast<int>(bl.first), nb = static_cast<int>(bl.last - bl.first);
    const int m = static_cast<int>(t.m(S)), run = static_cast<int>(t.d_in * S);
    for (int i = 0; i < nb * m; ++i) {
      const int b = i / m, e = i - b * m;
      const int64_t addr =
          pk::steer_block_base(t, fields.data(), first + b, c_in, S) + pk::steer_elem_offset(e, run, c_in * S);
      CHECK(addr >= 0 && addr < c_out * c_in * S);
      if (addr >= 0 && addr < c_out * c_in * S) ++hits[addr];
    }
  }
  for (int h : hits) CHECK(h == 1);
}

int main() {
  elem_offsets();
  block_bases();
  projected_from_the_transpose();
  staging();
  scratch_offsets();
  tiles_cover_w_once();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("steerable math: all checks passed\n");
  return 0;
}
