// Unit tests of the code every kernel shares beyond the per-orbit formulas (no torch needed): the
// group-order switch and its classes (static_switch.h), the streamed class against the array
// classes, the orbit walk with the CUDA grid-stride step (orbit_math.h), the chunk walks
// (multi_math.h), the layer descriptor that the penalty and the decay share (layer_desc.h,
// decay_math.h) and the launch plan (launch_plan.h), all run on the CPU.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "decay_math.h"
#include "launch_plan.h"
#include "layer_desc.h"
#include "multi_math.h"
#include "orbit_math.h"
#include "checks.h"
#include "static_switch.h"

namespace pk = projkernels;


// A deterministic pseudo-random value in [-1, 1).
static double value(int64_t i) {
  uint64_t x = static_cast<uint64_t>(i) * 6364136223846793005ull + 1442695040888963407ull;
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return static_cast<double>(x % 2000001) / 1000000.0 - 1.0;
}

// The classes of the switch, and that the macro hands the lambda the class of its argument.
static void group_order_classes() {
  const int orders[] = {1, 2, 3, 4, 5, 6, 8, 12, 16, 17, 24, 48, 64, 65, 96, 128, 1000};
  for (int G : orders) {
    const int k = GROUP_ORDER_SWITCH(G, K, [&] { return K; });
    CHECK(k == pk::group_order_class(G));
    if (k > 0) CHECK(k == G);                                // exact: the constant is the order
    if (k < 0) CHECK(G <= -k && -k <= pk::kMaxArrayOrder);  // array: the bound holds the orbit
    if (k == 0) CHECK(G > pk::kMaxArrayOrder);              // streamed only above the array bound
  }
  CHECK(pk::group_order_class(3) == -16);
  CHECK(pk::group_order_class(64) == -pk::kMaxArrayOrder);
  CHECK(pk::group_order_class(65) == 0);
  CHECK(pk::array_bound(0) == 1 && pk::array_bound(-16) == 16 && pk::array_bound(8) == 8);
  CHECK(pk::order_of(4, 99) == 4 && pk::order_of(-16, 7) == 7 && pk::order_of(0, 300) == 300);
}

// The walk with a step larger than one (a CUDA thread's grid-stride walk: step = blockDim, or
// more than an orbits-per-block) lands on the same (block, orbit, base) as direct division: steps
// within a block, across one block, across a row of blocks (one and several rows at once).
static void orbit_walk_steps() {
  const int64_t stride_out = 1000, stride_in = 50;
  const int64_t opbs[] = {1, 7, 36};
  const int64_t c_ins[] = {1, 2, 3, 100};
  const int64_t steps[] = {1, 2, 6, 7, 8, 20, 21, 256};
  for (int64_t opb : opbs) {
    for (int64_t c_in : c_ins) {
      for (int64_t start = 0; start < 30; start += 5) {
        for (int64_t step : steps) {
          pk::OrbitWalk it(start, opb, c_in, stride_out, stride_in);
          for (int64_t id = start; id < 4000; id += step, it.advance(step)) {
            const int64_t b = id / opb;
            CHECK(it.block == b);
            CHECK(it.orbit == id % opb);
            CHECK(it.base == (b / c_in) * stride_out + (b % c_in) * stride_in);
          }
        }
      }
    }
  }
}

// Every class computes the same orbit energies and gradient: the streamed class (K = 0) and the
// array classes agree on a 12-element orbit with a stabiliser of order 2 (entries listed twice).
template <int K>
static void energies_of_class(const std::vector<double>& w, const std::vector<int32_t>& offs, int G,
                              const std::vector<double>& basis, double* pen, double* eq, std::vector<double>& rows,
                              std::vector<double>& grad) {
  rows.assign(G, 0.0);
  const pk::OrbitEnergy<double> e = pk::orbit_energy<K, true>(w.data(), 3, offs.data(), G, 0.5, basis.data(), rows.data());
  *pen = e.pen;
  *eq = e.eq;
  grad.assign(w.size(), -7.0);
  pk::write_orbit_gradient<K>(w.data(), grad.data(), 3, offs.data(), G, 0.5, 0.25);
}

static void classes_agree() {
  const int G = 12;
  std::vector<double> w(20);
  for (int i = 0; i < 20; ++i) w[i] = value(i);
  std::vector<int32_t> offs(G);
  for (int g = 0; g < G; ++g) offs[g] = g % 6;  // six entries, each listed twice
  // Any fixed matrix exercises the row sums; rows are not required to be orthonormal here.
  std::vector<double> basis(G * G);
  for (int i = 0; i < G * G; ++i) basis[i] = value(100 + i);

  // Direct evaluation.
  double mean = 0;
  for (int g = 0; g < G; ++g) mean += w[3 + offs[g]];
  mean /= G;
  double pen = 0;
  for (int g = 0; g < G; ++g) pen += 0.5 * (w[3 + offs[g]] - mean) * (w[3 + offs[g]] - mean);
  const double eq = 0.5 * G * mean * mean;

  double p[3], q[3];
  std::vector<double> rows[3], grad[3];
  energies_of_class<-16>(w, offs, G, basis, &p[0], &q[0], rows[0], grad[0]);
  energies_of_class<-pk::kMaxArrayOrder>(w, offs, G, basis, &p[1], &q[1], rows[1], grad[1]);
  energies_of_class<0>(w, offs, G, basis, &p[2], &q[2], rows[2], grad[2]);
  for (int c = 0; c < 3; ++c) {
    CHECK_CLOSE(p[c], pen, 1e-14);
    CHECK_CLOSE(q[c], eq, 1e-14);
    for (int r = 1; r < G; ++r) {
      double coef = 0;
      for (int g = 0; g < G; ++g) coef += basis[r * G + g] * (w[3 + offs[g]] - mean);
      CHECK_CLOSE(rows[c][r], 0.5 * coef * coef, 1e-13);
    }
    CHECK(rows[c][0] == 0.0);
    for (int i = 0; i < 20; ++i) {
      if (i >= 3 && i < 9) {
        CHECK_CLOSE(grad[c][i], 0.5 * (w[i] - mean) + 0.25 * mean, 1e-14);
      } else {
        CHECK(grad[c][i] == -7.0);  // entries outside the orbit are never written
      }
    }
  }
}

// P(W) (two_grad_pen = 0, two_grad_eq = 1) of an orbit holding an inf is inf, as the reference
// gives, not 0 * (inf - inf) = NaN; in every class.
template <int K>
static void projection_keeps_inf() {
  const float inf = std::numeric_limits<float>::infinity();
  const float w[4] = {1.0f, inf, 2.0f, 3.0f};
  const int32_t offs[4] = {0, 1, 2, 3};
  float out[4] = {0, 0, 0, 0};
  pk::write_orbit_gradient<K>(w, out, 0, offs, 4, 0.0f, 1.0f);
  for (float v : out) CHECK(std::isinf(v) && v > 0);
  // The penalty gradient of such an orbit is not finite either way (2 g_pen (inf - inf)).
  pk::write_orbit_gradient<K>(w, out, 0, offs, 4, 1.0f, 0.0f);
  CHECK(std::isnan(out[1]));
}

// The CUDA chunk walk: T threads each walking every T-th orbit of a chunk that crosses block
// boundaries visit every orbit once and give the sums of the CPU's single walk.
static void chunk_walk_with_threads() {
  // 3 x 2 blocks of a C4 weight, 2 orbits of 4 entries per block (blocks 8 entries apart).
  const int G = 4;
  pk::LayerDesc d{};
  std::vector<float> w(6 * 8);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(value(static_cast<int64_t>(i)));
  const int32_t offs[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  const double inv_stab[2] = {1.0, 1.0};
  d.weight = w.data();
  d.offsets = offs;
  d.inv_stab = inv_stab;
  d.c_in = 2;
  d.stride_out = 16;
  d.stride_in = 8;
  d.orbits_per_block = 2;
  d.n_orbits = 12;
  d.G = G;
  double pen1 = 0, eq1 = 0;
  pk::chunk_energies<4, false, float, float, double>(d, offs, 1, 11, 1, pen1, eq1);
  for (int64_t T : {2, 3, 5, 64}) {
    double pen = 0, eq = 0;
    for (int64_t t = 0; t < T; ++t) pk::chunk_energies<4, false, float, float, double>(d, offs, 1 + t, 11, T, pen, eq);
    CHECK_CLOSE(pen, pen1, 1e-6);
    CHECK_CLOSE(eq, eq1, 1e-6);
    // The gradient walk writes exactly the chunk's entries.
    std::vector<float> grad(w.size(), -7.0f);
    d.out = grad.data();
    for (int64_t t = 0; t < T; ++t) pk::chunk_gradient<0, float, float>(d, offs, 1 + t, 11, T, 1.0f, 0.5f);
    for (int64_t id = 0; id < 12; ++id) {
      const int64_t b = id / 2, base = (b / 2) * 16 + (b % 2) * 8 + (id % 2) * 4;
      const bool inside = id >= 1 && id < 11;
      float mean = 0;
      for (int g = 0; g < G; ++g) mean += w[base + g];
      mean /= G;
      for (int g = 0; g < G; ++g) {
        if (inside) {
          CHECK_CLOSE(grad[base + g], (w[base + g] - mean) + 0.5f * mean, 1e-6);
        } else {
          CHECK(grad[base + g] == -7.0f);
        }
      }
    }
  }
}

// The batched walks (B orbits' loads issued before any is used, the CUDA kernels' opt-in) give the
// one-orbit walk's sums bit for bit, thread by thread, and write the same gradient: full batches,
// the orbits left over, chunks that start and end inside blocks, steps from 1 to more than a chunk.
template <int K, int B>
static void batched_walk_of_class() {
  // 5 x 7 blocks, 3 orbits per block, each orbit K entries of the block (a permutation of its 3 K
  // entries); blocks 3 K entries apart in a row, rows 7 blocks (plus 5 unused entries) apart.
  const int64_t opb = 3, c_out = 5, c_in = 7, block = opb * K, stride_out = c_in * block + 5;
  std::vector<int32_t> offs(opb * K);
  for (int64_t i = 0; i < opb * K; ++i) offs[i] = static_cast<int32_t>((i * 5 + 2) % (opb * K));
  const double inv_stab[3] = {1.0, 0.5, 0.25};
  std::vector<float> w(c_out * stride_out);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(value(static_cast<int64_t>(i) + 11));
  pk::LayerDesc d{};
  d.weight = w.data();
  d.offsets = offs.data();
  d.inv_stab = inv_stab;
  d.c_in = c_in;
  d.stride_out = stride_out;
  d.stride_in = block;
  d.orbits_per_block = opb;
  d.n_orbits = opb * c_out * c_in;
  d.G = K;
  for (int64_t T : {1, 2, 3, 7, 64, 200}) {
    for (int64_t first : {int64_t(0), int64_t(4)}) {
      const int64_t last = d.n_orbits - first;
      std::vector<float> g1(w.size(), -7.0f), gb(w.size(), -7.0f);
      for (int64_t t = 0; t < T; ++t) {
        float pen1 = 0, eq1 = 0, penb = 0, eqb = 0;
        pk::chunk_energies<K, false, float, float, float>(d, offs.data(), first + t, last, T, pen1, eq1);
        pk::chunk_energies<K, false, float, float, float, float, B>(d, offs.data(), first + t, last, T, penb, eqb);
        CHECK(penb == pen1 && eqb == eq1);
        d.out = g1.data();
        pk::chunk_gradient<K, float, float>(d, offs.data(), first + t, last, T, 0.8f, -0.3f);
        d.out = gb.data();
        pk::chunk_gradient<K, float, float, B>(d, offs.data(), first + t, last, T, 0.8f, -0.3f);
      }
      CHECK(g1 == gb);
    }
  }
}

static void batched_walks() {
  CHECK(pk::batch_orbits(4) == 4 && pk::batch_orbits(1) == 8 && pk::batch_orbits(16) == 1);
  CHECK(pk::batch_orbits(8, 8) == 1 && pk::batch_orbits(2, 8) == 4 && pk::batch_orbits(-16) == 1);
  batched_walk_of_class<4, 4>();
  batched_walk_of_class<2, 8>();
  batched_walk_of_class<8, 2>();
  batched_walk_of_class<1, 3>();
}

// The multi-tensor chunking: each CUDA block finds its layer and orbit range from the descriptors
// (layer_of_chunk, chunk_range) instead of reading a chunk list; both must give the list's chunks,
// also when the layers are split into launches of a few layers each.
static void multi_chunks_by_lookup() {
  const int64_t orbits[] = {1, 1024, 1025, 3000, 7, 4096, 2};
  const int64_t L = 7, per_chunk = 1024;
  std::vector<pk::LayerDesc> layers(L);
  for (int64_t l = 0; l < L; ++l) layers[l].n_orbits = orbits[l];
  const int64_t n = pk::assign_chunks(layers.data(), L, per_chunk);
  CHECK(n == 1 + 1 + 2 + 3 + 1 + 4 + 1);
  std::vector<pk::Chunk> list(n);
  pk::list_chunks(layers.data(), L, per_chunk, list.data());
  for (int64_t group : {L, int64_t(3), int64_t(1)}) {  // layers per launch
    for (int64_t l0 = 0; l0 < L; l0 += group) {
      const int count = static_cast<int>(group < L - l0 ? group : L - l0);
      const pk::LayerDesc* launch = layers.data() + l0;
      for (int64_t c = launch[0].chunk_begin; c < launch[count - 1].chunk_end; ++c) {
        const int j = pk::layer_of_chunk(launch, count, c);
        const pk::ChunkRange r = pk::chunk_range(launch[j], c, per_chunk);
        CHECK(l0 + j == list[c].layer);
        CHECK(r.first == list[c].first && r.last == list[c].last);
      }
    }
  }
}

static void chunk_plan() {
  const int64_t T = 256;
  // C4 regular 2048x2048x3x3 fp32: 16 bytes an orbit, four orbits a thread, 9216 chunks.
  const int64_t n = 2048LL * 2048 * 9 / 4;
  CHECK(pk::plan_chunk_orbits(n, 4, 4, T) == 4 * T);
  CHECK(pk::plan_chunk_orbits(n, 4, 2, T) == 8 * T);    // bf16: twice the orbits
  CHECK(pk::plan_chunk_orbits(n, 64, 8, T) == T);       // large orbits: one a thread
  CHECK(pk::plan_chunk_orbits(n, 1000, 4, T) == T);
  // Small weights: fewer orbits a thread until there are kMinChunks chunks (or one a thread).
  CHECK(pk::plan_chunk_orbits(1000, 1, 4, T) == T);
  const int64_t mid = pk::kMinChunks * 2 * T;  // exactly kMinChunks chunks at two orbits a thread
  CHECK(pk::plan_chunk_orbits(mid, 1, 4, T) == 2 * T);
  for (int64_t orbits : {int64_t(1), int64_t(255), int64_t(70000), n, int64_t(1) << 34}) {
    for (int64_t G : {1, 2, 4, 8, 16, 48, 64, 65, 512}) {
      for (int64_t e : {2, 4, 8}) {
        const int64_t c = pk::plan_chunk_orbits(orbits, G, e, T);
        CHECK(c % T == 0 && c >= T && c <= pk::kMaxOrbitsPerThread * T);
      }
    }
  }
}

static void shared_plan() {
  const int64_t budget = 48 * 1024 - 1024;
  // C64 / D32 in float64 with the spectrum: the 32 KiB basis fits; the offsets (16 KiB) would not
  // fit beside it, so they are read from global memory.  The old layout asked for 48 KiB + static.
  pk::SharedPlan p = pk::plan_shared(64, 64 * 9, 8, true, 256 * 64 * 8, budget);
  CHECK(p.basis_bytes == 64 * 64 * 8);
  CHECK(p.total() <= budget);
  // A basis larger than the budget is read from global memory.
  p = pk::plan_shared(128, 16, 8, true, 256 * 128 * 8, budget);
  CHECK(!p.stage_basis());
  CHECK(p.offsets_bytes == 16 * 128 * 4);
  // Small tables next to a large chunk are staged; a table as large as the chunk is not.
  p = pk::plan_shared(4, 36, 4, false, 1024 * 16, budget);
  CHECK(p.offsets_bytes == 36 * 4 * 4 && !p.stage_basis());
  p = pk::plan_shared(4, 1024, 4, false, 1024 * 16, budget);
  CHECK(!p.stage_offsets());
  for (int64_t G = 1; G <= 1024; G = G < 16 ? G + 1 : G * 2)
    for (int64_t opb : {1, 9, 100, 5000})
      for (bool spec : {false, true})
        for (int64_t acc : {4, 8}) CHECK(pk::plan_shared(G, opb, acc, spec, 1 << 16, budget).total() <= budget);
}

// An orbit table of C2 acting on regular fields (so = si = 2) with a 1-D kernel of 3 (reversal):
// entry (a, b, x) pairs with (1 - a, 1 - b, 2 - x), six orbits of two entries per block.
struct C2Layout {
  int64_t c_out, c_in, k = 3, so = 2, si = 2;
  int64_t stride_in() const { return si * k; }
  int64_t row_len() const { return c_in * stride_in(); }
  int64_t stride_out() const { return so * row_len(); }
  int64_t numel() const { return c_out * stride_out(); }
  std::vector<int32_t> offsets() const {
    std::vector<int32_t> o;
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t x = 0; x < 3; ++x) {
        o.push_back(static_cast<int32_t>(0 * row_len() + b * k + x));
        o.push_back(static_cast<int32_t>(1 * row_len() + (1 - b) * k + (2 - x)));
      }
    return o;
  }
};

// The tiled kernels step by step on the CPU: plan, remap, copy the segments in, walk the tile
// with T "threads", write the gradient in place and copy it back; against the global walks.
static void tiles_emulated() {
  const C2Layout L{3, 37};
  const std::vector<int32_t> offs = L.offsets();
  const int64_t opb = 6, G = 2;
  std::vector<double> inv_stab(opb, 1.0), w(L.numel());
  for (size_t i = 0; i < w.size(); ++i) w[i] = value(static_cast<int64_t>(i) + 500);
  pk::LayerDesc d{};
  d.weight = w.data();
  d.offsets = offs.data();
  d.inv_stab = inv_stab.data();
  d.c_in = L.c_in;
  d.stride_out = L.stride_out();
  d.stride_in = L.stride_in();
  d.orbits_per_block = opb;
  d.n_orbits = opb * L.c_out * L.c_in;
  d.G = static_cast<int32_t>(G);

  // Eight blocks of 96 bytes a tile: five tiles per row, the last one five blocks wide.
  const pk::TilePlan tp = pk::plan_tiles(L.c_out, L.c_in, L.stride_out(), L.stride_in(), opb, G, 8, 8 * 96, 1);
  CHECK(tp.ok && tp.so == 2 && tp.row_len == L.row_len() && tp.blocks_per_tile == 8);
  CHECK(tp.tiles_per_row == 5 && tp.n_tiles == 15 && tp.offsets_bytes == 48);
  // With the defaults, a weight this small gets tiles of one block (more tiles for the GPU).
  CHECK(pk::plan_tiles(L.c_out, L.c_in, L.stride_out(), L.stride_in(), opb, G, 8).blocks_per_tile == 1);
  // Widths keep tile starts 16-byte aligned: D4 between trivial fields on 5x5 kernels in float32
  // (100-byte blocks) gets a multiple of 4 blocks, C4 regular 3x3 (576-byte blocks) any width.
  const pk::TilePlan d4 = pk::plan_tiles(2048, 2048, 2048 * 25, 25, 6, 8, 4);
  CHECK(d4.ok && d4.blocks_per_tile % 4 == 0 && d4.blocks_per_tile >= 100);
  CHECK((d4.blocks_per_tile * 25 * 4) % 16 == 0);
  const pk::TilePlan c4 = pk::plan_tiles(512, 512, 4 * 512 * 36, 36, 36, 4, 4);
  CHECK(c4.ok && c4.blocks_per_tile == 28 && c4.tiles_per_row == 19 && c4.n_tiles == 512 * 19);
  CHECK(c4.shared_bytes() == 36 * 4 * 4 + 4 * 28 * 36 * 4);
  // A layout whose rows do not tile, and a block above the shared-memory budget, are not tiled.
  CHECK(!pk::plan_tiles(L.c_out, L.c_in, L.stride_out() + 1, L.stride_in(), opb, G, 8).ok);
  CHECK(!pk::plan_tiles(2, 2, 2 * 2 * 8000, 8000, 100, 4, 4).ok);

  double pen_global = 0, eq_global = 0;
  pk::chunk_energies<2, false, double, double, double>(d, offs.data(), 0, d.n_orbits, 1, pen_global, eq_global);
  std::vector<double> grad_global(w.size(), -7.0), grad_tiled(w.size(), -9.0);
  d.out = grad_global.data();
  pk::chunk_gradient<2, double, double>(d, offs.data(), 0, d.n_orbits, 1, 0.8, -0.3);

  double pen_tiles = 0, eq_tiles = 0;
  int64_t orbits_seen = 0;
  for (int64_t ti = 0; ti < tp.n_tiles; ++ti) {
    const pk::Tile t = pk::tile_at(tp, ti, d.c_in, d.stride_in, opb);
    CHECK(t.width == (t.fi0 == 32 ? 5 : 8));
    CHECK(t.first_orbit == (t.fo * d.c_in + t.fi0) * opb);
    std::vector<int32_t> s_offs(opb * G);
    for (int64_t i = 0; i < opb * G; ++i)
      CHECK(pk::remap_offset(offs[i], tp.row_len, d.stride_in, tp.so, t.pitch, &s_offs[i]));
    std::vector<double> tile(tp.so * t.pitch);
    for (int64_t a = 0; a < tp.so; ++a)
      for (int64_t i = 0; i < t.pitch; ++i)
        tile[a * t.pitch + i] = w[pk::tile_global_index(t, a, i, d.stride_out, tp.row_len, d.stride_in)];
    const int64_t n_local = t.width * opb;
    // The tile's walk (T threads, step T) against the global walk over the same orbits.
    const pk::LayerDesc local = pk::tile_desc(d, t, tile.data(), tile.data());
    double pen = 0, eq = 0, pen_g = 0, eq_g = 0;
    for (int64_t th = 0; th < 4; ++th)
      pk::chunk_energies<2, false, double, double, double>(local, s_offs.data(), th, n_local, 4, pen, eq);
    pk::chunk_energies<2, false, double, double, double>(d, offs.data(), t.first_orbit, t.first_orbit + n_local, 1,
                                                         pen_g, eq_g);
    CHECK_CLOSE(pen, pen_g, 1e-13);
    CHECK_CLOSE(eq, eq_g, 1e-13);
    pen_tiles += pen;
    eq_tiles += eq;
    orbits_seen += n_local;
    for (int64_t th = 0; th < 4; ++th)
      pk::chunk_gradient_in_place<2, double, double>(local, s_offs.data(), th, n_local, 4, 0.8, -0.3);
    for (int64_t a = 0; a < tp.so; ++a)
      for (int64_t i = 0; i < t.pitch; ++i)
        grad_tiled[pk::tile_global_index(t, a, i, d.stride_out, tp.row_len, d.stride_in)] = tile[a * t.pitch + i];
  }
  CHECK(orbits_seen == d.n_orbits);
  CHECK_CLOSE(pen_tiles, pen_global, 1e-13);
  CHECK_CLOSE(eq_tiles, eq_global, 1e-13);
  // Same arithmetic per orbit: the tiled gradient is the global one bit for bit, everywhere.
  for (size_t i = 0; i < w.size(); ++i) CHECK(grad_tiled[i] == grad_global[i]);
  for (size_t i = 0; i < w.size(); ++i) CHECK(grad_global[i] != -7.0);

  // Offsets that are not (segment, rest) pairs of a block are refused.
  int32_t v = 0;
  CHECK(!pk::remap_offset(L.stride_in(), tp.row_len, L.stride_in(), tp.so, 48, &v));  // rest == stride_in
  CHECK(!pk::remap_offset(2 * L.row_len(), tp.row_len, L.stride_in(), tp.so, 48, &v));  // segment == so
  CHECK(!pk::remap_offset(-1, tp.row_len, L.stride_in(), tp.so, 48, &v));
  CHECK(pk::remap_offset(L.row_len() + 5, tp.row_len, L.stride_in(), tp.so, 48, &v) && v == 48 + 5);
}

// One descriptor for the penalty's gradient and the decay: the decay's update with coefficients
// (c_dev, c_mean) writes target + c_dev (W - P W) + c_mean P W, which is the gradient walk's
// 2 g_pen (W - P W) + 2 g_eq P W plus the target, for g_pen = c_dev / 2 and g_eq = c_mean / 2, on
// the same LayerDesc; in place (out == weight) it reads the old W only.
static void decay_and_gradient_share_the_descriptor() {
  const int G = 4;
  std::vector<double> w(6 * 8), target(6 * 8), grad(6 * 8);
  for (size_t i = 0; i < w.size(); ++i) {
    w[i] = value(static_cast<int64_t>(i));
    target[i] = value(static_cast<int64_t>(i) + 1000);
  }
  const int32_t offs[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  const double inv_stab[2] = {1.0, 1.0};
  pk::LayerDesc d{};
  d.weight = w.data();
  d.offsets = offs;
  d.inv_stab = inv_stab;
  d.c_in = 2;
  d.stride_out = 16;
  d.stride_in = 8;
  d.orbits_per_block = 2;
  d.n_orbits = 12;
  d.G = G;
  d.dtype = pk::kF64;
  d.coef_dev = 0.3;
  d.coef_mean = -0.7;
  d.out = grad.data();
  pk::chunk_gradient<4, double, double>(d, offs, 0, 12, 1, 0.3, -0.7);
  std::vector<double> updated = target;
  d.out = updated.data();
  pk::decay::decay_chunk<4, false, double, double>(d, 0, 12, 1);
  for (size_t i = 0; i < w.size(); ++i) CHECK_CLOSE(updated[i], target[i] + grad[i], 1e-12);
  std::vector<double> in_place = w;
  d.weight = in_place.data();
  d.out = in_place.data();
  pk::decay::decay_chunk<4, true, double, double>(d, 0, 12, 1);
  for (size_t i = 0; i < w.size(); ++i) CHECK_CLOSE(in_place[i], w[i] + grad[i], 1e-12);
}

int main() {
  tiles_emulated();
  group_order_classes();
  orbit_walk_steps();
  classes_agree();
  projection_keeps_inf<4>();
  projection_keeps_inf<-16>();
  projection_keeps_inf<0>();
  chunk_walk_with_threads();
  batched_walks();
  multi_chunks_by_lookup();
  decay_and_gradient_share_the_descriptor();
  chunk_plan();
  shared_plan();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("kernel plan: all checks passed\n");
  return EXIT_SUCCESS;
}
