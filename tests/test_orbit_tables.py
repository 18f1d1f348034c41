"""Orbit tables against the group action computed by brute force, and the oracle against itself.

Pi_g permutes the entries of W.  Applying Pi_g densely to the tensor of entry indices
(tests/cases.py builds it from dense permutation matrices and the kernel action) gives s_g with
Pi_g(W)[x] = W[s_g(x)], i.e. Pi_g moves the entry at x to g . x = s_{g^-1}(x).  Every table row must
list g . e for g in element order (e in the identity's column: column 0 for C<N> and D<N>, column 3
for the cube groups, whose element order is escnn's), every row must be a true orbit, every entry must lie in exactly
one row, and 1/|Stab| must be the inverse of the number of elements fixing the entry.
"""
import pytest
import torch

import projkernels as pk

from cases import ALL_CASES, CASES_3D, Oracle, case_id, group_copies, seeded_weight, shape_for

# Larger orders (kernel-free weights), up to the compiled kernels' bound of 64.
EXTRA = [(g, shape_for(g, ir, orr, (), ci, co), ir, orr) for g, ir, orr, ci, co in
         [("C16", "regular", "regular", 1, 2), ("D16", "regular", "trivial", 2, 2),
          ("C64", "trivial", "regular", 2, 1), ("D32", "regular", "regular", 1, 1)]]


def _action(case):
    """S[g, x] = s_g(x) on the flat entries of a weight of the case's shape."""
    group, shape, ir, orr = case
    G = pk.get_group(group)
    n = torch.Size(shape).numel()
    idx = torch.arange(n, dtype=torch.float64).reshape(shape)
    return G, group_copies(idx, group, ir, orr).reshape(G.order, n).round().long()


@pytest.mark.parametrize("case", ALL_CASES + EXTRA + CASES_3D[::2], ids=case_id)
def test_table_matches_brute_force_action(case):
    group, shape, ir, orr = case
    G, S = _action(case)
    n = S.shape[1]
    # The dense maps form a permutation action: Pi_gh = Pi_g Pi_h means s_gh = s_h o s_g.
    assert all(torch.equal(torch.sort(S[g]).values, torch.arange(n)) for g in range(G.order))
    mul = torch.as_tensor(G.mul)
    assert torch.equal(S[:, S], S[mul.T]), "the dense maps do not follow the multiplication table"  # [h, g, x]

    table = pk.orbit_table(shape, group, ir, orr)
    rows = table.gather_index                        # [orbits, |G|]: row[g] = g . e
    e = rows[:, G.identity]                          # the identity's column: the orbit's own entry
    inv = torch.as_tensor(G.inverse)
    assert torch.equal(rows, S[inv][:, e].T), "rows must list g . e for g in element order"

    # Every row is a true orbit and every entry lies in exactly one row.
    canon = torch.from_numpy(S.numpy().min(axis=0))   # a label per orbit: its smallest entry
    row_canon = canon[rows]
    assert (row_canon == row_canon[:, :1]).all(), "a row mixes two orbits"
    assert len(set(row_canon[:, 0].tolist())) == rows.shape[0], "two rows list the same orbit"
    assert rows.shape[0] == len(set(canon.tolist())), "some orbit has no row"
    covered = torch.zeros(n, dtype=torch.bool)
    covered[rows.reshape(-1)] = True
    assert covered.all()

    # 1/|Stab|, counted independently as the number of elements that fix e.
    stab = (S[:, e] == e).sum(dim=0)
    inv_stab = table.inv_stab.repeat(table.n_blocks)
    assert torch.equal(inv_stab, 1.0 / stab.double()), "inv_stab differs from 1/|Stab| of the action"
    # ... and each member of an orbit appears |Stab| times in its row (the uniform-width form).
    for r in range(0, rows.shape[0], max(1, rows.shape[0] // 16)):
        assert (torch.bincount(rows[r])[rows[r]] == stab[r]).all()


@pytest.mark.parametrize("case", ALL_CASES[::17] + EXTRA[:2] + CASES_3D[5::11], ids=case_id)
def test_oracle_isotypic_projectors_resolve_the_identity(case):
    """The character projectors are orthogonal, add up to W, and the trivial one is P(W)."""
    group, shape, ir, orr = case
    o = Oracle(seeded_weight(case), group, ir, orr)
    scale = float(o.w.abs().max())
    torch.testing.assert_close(sum(o.components), o.w, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(o.components[0], o.p, rtol=0, atol=1e-12 * scale)
    for j, a in enumerate(o.components):
        for k, b in enumerate(o.components[:j]):
            assert abs(float((a * b).sum())) <= 1e-10 * float(o.w.square().sum()), (j, k)
    torch.testing.assert_close(o.spectrum.sum(), o.w.square().sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("group", ["C1", "C2", "C3", "C4", "C5", "C8", "D1", "D2", "D3", "D4", "D6", "D8", "C16",
                                   "D16", "O", "Oh", "T"])
def test_characters_are_orthogonal(group):
    # <chi_j, chi_k> = 0 for j != k, and <chi, chi>/|G| is 1 (real type) or 2 (C_N's 2-D irreps).
    G = pk.get_group(group)
    chi = torch.as_tensor(G.characters, dtype=torch.float64)
    gram = chi @ chi.T / G.order
    assert torch.allclose(gram - torch.diag(gram.diagonal()), torch.zeros_like(gram), atol=1e-12)
    assert all(abs(float(v) - 1) < 1e-12 or abs(float(v) - 2) < 1e-12 for v in gram.diagonal())
    # The irreps' dimensions add up to the regular representation: sum_rho dim(rho) * (number of copies).
    dims = torch.as_tensor(G.irrep_dims, dtype=torch.float64)
    assert abs(float((dims * dims / gram.diagonal()).sum()) - G.order) < 1e-9
