"""The case matrix of (group, weight shape, in_rep, out_rep) shared by the test files, and the
independent oracle the backends are held against.

The oracle applies the definition as written: it builds every transformed copy
Pi_g(W) = rho_out(g) T_g(W) rho_in(g)^T densely (permutation matrices for the channel
representations, the group's kernel action on the kernel dims; for the cube groups' 3-D kernels an
independent point-by-point restatement of it from the elements' 3x3 matrices) and averages them.  It uses only the
group's data (element order, multiplication table, characters, kernel action) and never the orbit
tables, their 1/|Stab| weights, the isotypic basis or its row-to-irrep map, so a wrong table or a
mislabelled spectrum row cannot agree with it by construction.
"""
import functools
import itertools
import os
import zlib

import torch

from projkernels.groups import get_group

REP_PAIRS = list(itertools.product(("trivial", "regular"), repeat=2))  # (in_rep, out_rep)

# Where the Triton kernels run in this process: on CPU tensors under Triton's interpreter
# (TRITON_INTERPRET=1, fixed when triton is imported), else on a GPU, else nowhere (None).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_DEVICE = "cpu" if TRITON_INTERPRET else ("cuda" if torch.cuda.is_available() else None)
TRITON_SKIP_REASON = ("the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 in the environment to run on "
                      "the CPU")


def field_size(rep, G):
    # Restated here rather than imported from the orbit machinery under test.  A rep given by its
    # matrices (an array [|G|, n, n], the signed-permutation fields of tests/test_signed_fields.py) has size n.
    if not isinstance(rep, str):
        return rep.shape[1]
    return 1 if rep == "trivial" else G.order


def shape_for(group, in_rep, out_rep, kernel, c_in, c_out):
    G = get_group(group)
    return (c_out * field_size(out_rep, G), c_in * field_size(in_rep, G)) + tuple(kernel)


def _cases(groups, kernels, fields=((1, 1), (2, 3))):
    out = []
    for group, kernel, (ir, orr), (ci, co) in itertools.product(groups, kernels, REP_PAIRS, fields):
        out.append((group, shape_for(group, ir, orr, kernel, ci, co), ir, orr))
    return out


CASES_2D = _cases(("C1", "C2", "C4", "D1", "D2", "D4"), [(k, k) for k in range(1, 6)])
CASES_1D = _cases(("C1", "C2", "D1", "D2"), [(k,) for k in range(1, 5)])
CASES_LINEAR = _cases([f"{t}{n}" for t in "CD" for n in range(1, 9)], [()])
ALL_CASES = CASES_2D + CASES_1D + CASES_LINEAR
# The cube groups on Conv3d weights (odd and even k, 1x1x1) and kernel-free ones; Oh's regular fields
# are 48 channels, so the largest shapes keep one field per side.
CASES_3D = [c for c in _cases(("O", "Oh", "T"), [(), (1, 1, 1), (2, 2, 2), (3, 3, 3)], fields=((1, 1), (2, 1)))
            if torch.Size(c[1]).numel() <= (65000 if c[1][0] * c[1][1] <= 48 * 48 else 8000)]


def case_id(case):
    group, shape, ir, orr = case
    return f"{group}-{'x'.join(map(str, shape))}-{ir[:3]}-{orr[:3]}"


def seeded_weight(case, dtype=torch.float64, salt=""):
    """A random weight for ``case``, the same in every process and test file (seeded by the case id)."""
    g = torch.Generator().manual_seed(zlib.crc32((case_id(case) + salt).encode()))
    return torch.randn(case[1], generator=g, dtype=torch.float64).to(dtype)


# --- the oracle --------------------------------------------------------------------------------

def dense_rep(G, rep, g, fields):
    """rho(g) on ``fields`` fields as a dense permutation matrix: rho(g) e_h = e_{g h} (regular), or
    the given matrices rho(g) of a rep passed as an array [|G|, n, n] (signs included)."""
    if not isinstance(rep, str):
        return torch.block_diag(*([torch.as_tensor(rep[g], dtype=torch.float64)] * fields))
    size = field_size(rep, G)
    rho = torch.zeros(size, size, dtype=torch.float64)
    if rep == "trivial":
        rho[0, 0] = 1
    else:
        for h in range(size):
            rho[int(G.mul[g, h]), h] = 1
    return torch.block_diag(*([rho] * fields))


def grid_action(w, matrix):
    """T_g on a (out, in, k, k, k) weight from g's 3x3 matrix on points, written out point by point
    (independently of the groups' own flip-and-permute code): the kernel entry at array index
    (a, b, c) sits at (x, y, z) = (c - o, o - b, o - a), o = (k - 1) / 2, and T_g(W) at p is W at
    g^-1 p."""
    k = w.shape[-1]
    o = (k - 1) / 2
    r_inv = torch.tensor(matrix.tolist(), dtype=torch.float64).T    # g^-1 = g^T for a rotation or reflection
    a, b, c = torch.meshgrid(*(torch.arange(k, dtype=torch.float64),) * 3, indexing="ij")
    points = torch.stack([c - o, o - b, o - a]).reshape(3, -1)
    x, y, z = (r_inv @ points).round(decimals=6)
    src = ((o - z) * k * k + (o - y) * k + (x + o)).round().long()
    flat = w.reshape(w.shape[0], w.shape[1], -1)
    return flat[:, :, src].reshape(w.shape)


def kernel_action(G, w, g):
    """T_g(W): the 3-D kernels of the cube groups by ``grid_action``, everything else by the group's own
    action (a kernel-free weight is not moved)."""
    if G.matrices is not None and w.dim() == 5 and any(s != 1 for s in w.shape[2:]):
        return grid_action(w, G.matrices[g])
    return G.kernel_action(w, g)


def group_copies(weight, group, in_rep, out_rep):
    """[|G|, *shape] float64: Pi_g(W) for every element g, in element order."""
    G = get_group(group)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    c_out, c_in = w.shape[0] // field_size(out_rep, G), w.shape[1] // field_size(in_rep, G)
    out = []
    for g in range(G.order):
        t = kernel_action(G, w, g)
        left = torch.tensordot(dense_rep(G, out_rep, g, c_out), t, dims=([1], [0]))        # rho_out(g) T_g(W)
        out.append(torch.tensordot(left, dense_rep(G, in_rep, g, c_in), dims=([1], [1])).movedim(-1, 1))  # ... rho_in(g)^T
    return torch.stack(out)


class Oracle:
    """P(W), the penalty, the energy and the isotypic energies of one float64 weight, from the dense action."""

    def __init__(self, weight, group, in_rep, out_rep):
        G = get_group(group)
        self.group = G
        self.w = weight.detach().to(device="cpu", dtype=torch.float64)
        copies = group_copies(self.w, group, in_rep, out_rep)
        self.p = copies.mean(dim=0)
        self.penalty = (self.w - self.p).square().sum()
        self.energy = self.p.square().sum()
        # Isotypic projectors P_rho = (dim rho / (|G| <chi, chi>/|G|)) sum_g chi(g) Pi_g; <chi, chi>/|G| is 2
        # for the real irreps of complex type (C_N's 2-D irreps), 1 otherwise.
        self.components = []
        for k, chi in enumerate(G.characters):
            chi = torch.as_tensor(chi, dtype=torch.float64)
            m = float(chi.dot(chi)) / G.order
            self.components.append(G.irrep_dims[k] / (G.order * m) * torch.einsum("g,g...->...", chi, copies))
        self.spectrum = torch.stack([c.square().sum() for c in self.components])

    @property
    def grad_penalty(self):
        return 2 * (self.w - self.p)

    @property
    def grad_energy(self):
        return 2 * self.p


@functools.lru_cache(maxsize=64)
def _cached_oracle(case, dtype_name, salt):
    w = seeded_weight(case, getattr(torch, dtype_name), salt)
    return Oracle(w, case[0], case[2], case[3])


def oracle_for(case, dtype=torch.float64, salt=""):
    """The oracle of ``seeded_weight(case, dtype, salt)`` (on its rounded values), cached."""
    return _cached_oracle(case, str(dtype).split(".")[-1], salt)


# --- a group that is neither cyclic nor dihedral ---------------------------------------------------

@functools.lru_cache(maxsize=None)
def c2_x_c4():
    """C2 x C4 as data (elements (a, b), (a1, b1)(a2, b2) = (a1 xor a2, b1 + b2 mod 4)), acting on
    kernel-free weights only.  Its real irreps: four 1-D ones (-1)^(a s) (+-1)^b and two 2-D ones of
    complex type with characters 2 (-1)^(a s) cos(pi b / 2)."""
    import numpy as np

    from projkernels.groups import FiniteGroup

    elements = tuple((a, b) for a in range(2) for b in range(4))
    mul = np.array([[elements.index((a1 ^ a2, (b1 + b2) % 4)) for (a2, b2) in elements] for (a1, b1) in elements])
    a = np.array([e[0] for e in elements])
    b = np.array([e[1] for e in elements])
    names, dims, chars = [], [], []
    for s in (0, 1):
        for t in (0, 2):
            names.append(f"({s},{t})"); dims.append(1); chars.append((-1.0) ** (a * s) * np.cos(np.pi * t * b / 2))
    for s in (0, 1):
        names.append(f"({s},1)"); dims.append(2); chars.append(2 * (-1.0) ** (a * s) * np.cos(np.pi * b / 2))
    order = [0, 1, 2, 3, 4, 5]  # trivial first, as every group's spectrum starts with the equivariant energy

    def action(kernel, element, n):
        if any(k != 1 for k in kernel.shape[2:]):
            raise ValueError("C2xC4 acts on kernel-free weights only")
        return kernel

    return FiniteGroup("C2xC4", elements, mul, tuple(names[i] for i in order), tuple(dims[i] for i in order),
                       np.round(np.stack([chars[i] for i in order]), 15), 4, True, action)
