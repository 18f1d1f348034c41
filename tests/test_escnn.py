"""Cross-check with escnn: weights that R2Conv expands from its equivariant basis have penalty 0."""
import os

import pytest
import torch

import projkernels as pk

if os.environ.get("PROJKERNELS_REQUIRE_ESCNN") == "1":
    import escnn  # noqa: F401  (CI sets the variable: there these checks must run, not skip)
else:
    escnn = pytest.importorskip("escnn", reason="escnn is an optional test dependency (pip install '.[escnn]')")
from escnn import gspaces, nn as enn  # noqa: E402

GSPACES = {"C4": lambda: gspaces.rot2dOnR2(4), "D4": lambda: gspaces.flipRot2dOnR2(4),
           "D1": lambda: gspaces.flip2dOnR2()}


def _expanded_weight(group, in_rep, out_rep, kernel_size, c_in=2, c_out=3, seed=0):
    gs = GSPACES[group]()
    rep = {"regular": gs.regular_repr, "trivial": gs.trivial_repr}
    conv = enn.R2Conv(enn.FieldType(gs, c_in * [rep[in_rep]]), enn.FieldType(gs, c_out * [rep[out_rep]]),
                      kernel_size=kernel_size, bias=False).to(torch.float64)
    # float64 like tests/test_escnn_interop.py: escnn shares sampled bases between modules, so a module
    # converted there would make a float32 expansion here fail with a dtype mismatch in either order.
    torch.manual_seed(seed)
    torch.nn.init.normal_(conv.weights)
    return conv.expand_parameters()[0].detach()


@pytest.mark.parametrize("group", sorted(GSPACES))
@pytest.mark.parametrize("in_rep", ["trivial", "regular"])
@pytest.mark.parametrize("out_rep", ["trivial", "regular"])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_escnn_weights_have_zero_penalty(group, in_rep, out_rep, kernel_size):
    w = _expanded_weight(group, in_rep, out_rep, kernel_size)
    assert w.abs().max() > 0
    kw = dict(group=group, in_rep=in_rep, out_rep=out_rep)
    for backend in pk.available_backends("cpu"):
        penalty, eq = pk.penalty_and_energy(w, **kw, backend=backend)
        assert penalty / (penalty + eq) <= 1e-10, backend
    # and a perturbed copy is clearly penalised, so the check above can fail
    noisy = w + 0.1 * w.abs().max() * torch.randn_like(w)
    assert pk.projected_penalty(noisy, **kw) / noisy.square().sum() > 1e-4


def test_escnn_irrep_order_and_characters():
    from escnn.group import dihedral_group, cyclic_group
    import numpy as np
    for n in (1, 2, 3, 4, 6):
        G = dihedral_group(n)
        ours = pk.get_group(f"D{n}")
        assert tuple(ir.name for ir in G.irreps()) == ours.irrep_names
        elements = list(G.elements)
        assert [str(e) for e in elements] == [str(G.element((f, j))) for f, j in ours.elements]
        for chi, ir in zip(ours.characters, G.irreps()):
            assert np.allclose(chi, [np.trace(ir(e)) for e in elements])
    assert len(cyclic_group(6).irreps()) == len(pk.irrep_names("C6"))
