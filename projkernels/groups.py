"""Finite groups as data: elements, multiplication table, real irreps, kernel action.

A group is described by tables only (``FiniteGroup``), so every backend works from the same
numbers: the element order fixes the regular representation's basis, ``mul`` fixes its law,
``characters`` fix the isotypic decomposition, and ``kernel_action`` says how an element moves a
kernel.  ``C<N>`` and ``D<N>`` are the built-in instances (docs/design.md, Conventions); a new
finite group is a new instance of the same dataclass, not new kernel code (docs/design.md, Adding a
group).  ``O``, ``Oh`` and ``T``, the symmetry groups of the cube (and of the tetrahedron inside it),
act on 3-D kernels (Conv3d weights) by signed permutations of the kernel axes.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import numpy as np
import torch

__all__ = ["FiniteGroup", "get_group", "irrep_names", "cyclic", "dihedral", "octahedral", "full_octahedral",
           "tetrahedral", "register_group", "group_name_for_ops"]


# The largest intermediate a group's tables need is the isotypic basis's [|G|, |G|, |G|] float64
# left-regular action (the multiplication table is [|G|, |G|]).  A group whose tables would pass
# this budget is refused before anything is allocated: order 512 is the largest that fits.
_MAX_TABLE_BYTES = 1 << 30
MAX_GROUP_ORDER = int(round((_MAX_TABLE_BYTES // 8) ** (1 / 3)))


def short_repr(value, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages echo what the user passed, and a
    megabyte-long argument must not become a megabyte-long message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_table_size(name: str, order: int) -> None:
    """ValueError naming the group when its tables would not fit in memory (before building them)."""
    if order > 1 << 20:  # the GiB figure below would overflow a float for a name with hundreds of digits
        raise ValueError(f"group: {short_repr(name)} has order {short_repr(order, 40)}; the largest order "
                         f"allowed is {MAX_GROUP_ORDER}")
    need = 8 * order ** 3
    if need > _MAX_TABLE_BYTES:
        raise ValueError(
            f"group: {name} has order {order}; its tables would need {need / 2 ** 30:.3g} GiB "
            f"(a [{order}, {order}, {order}] float64 array), more than the {_MAX_TABLE_BYTES / 2 ** 30:.3g} GiB "
            f"allowed; use a group of order at most {MAX_GROUP_ORDER}")


@dataclass(frozen=True, eq=False)
class FiniteGroup:
    name: str
    elements: Tuple[Tuple[int, int], ...]  # (reflection flag, rotation index) in regular-basis order
    mul: np.ndarray                         # mul[g, h] = index of g*h
    irrep_names: Tuple[str, ...]
    irrep_dims: Tuple[int, ...]
    characters: np.ndarray                  # [n_irreps, |G|] real characters of the real irreps
    rotation_order: int                     # N (the cube groups: the largest rotation order, 4 or 3)
    has_reflections: bool
    _kernel_action: Callable = field(repr=False, default=None)
    # The kernels the action is written for: 2 for the square-grid groups (which also act on 1-D
    # kernels), 3 for the cube groups (3-D kernels).  Kernel-free weights suit every group.
    kernel_ndim: int = 2
    # The cube groups: [|G|, 3, 3] integer matrices, how each element moves a point (x, y, z) of the
    # kernel grid (docs/design.md, Conventions); None for the others.
    matrices: Optional[np.ndarray] = field(repr=False, default=None)
    # A closed form of ``isotypic_basis`` (C<N>, D<N>): () -> (basis, row_irrep).  None: derived from
    # the characters.
    basis_builder: Optional[Callable] = field(repr=False, default=None)

    @property
    def order(self) -> int:
        return len(self.elements)

    def kernel_action(self, kernel: torch.Tensor, g: int) -> torch.Tensor:
        """T_g on the trailing kernel dims of ``kernel`` (docs/design.md, Conventions); orbit tables
        check that it is a group action."""
        return self._kernel_action(kernel, self.elements[g], self.rotation_order)

    @functools.cached_property
    def isotypic_basis(self) -> Tuple[np.ndarray, np.ndarray]:
        """An orthonormal basis of R^G adapted to the isotypic decomposition of the regular rep.

        Returns ``(basis, row_irrep)``: ``basis`` is [|G|, |G|] with orthonormal rows, each row lying
        in one isotypic component, ``row_irrep[r]`` the index of that component's irrep.  Row 0 is
        the constant function (the trivial irrep).  This is the real form of the group Fourier
        transform: for C_N it spans the same lines as the real DFT.  For f in R^G,
        ||P_rho f||^2 = sum over rows r of rho of (basis[r] . f)^2.

        Only the spectrum needs it: it is built on first use and kept.  C<N> and D<N> have it in
        closed form (cosines and sines, O(|G|^2)); any other group gets it from its characters.
        """
        n = self.order
        check_table_size(self.name, n)
        if self.basis_builder is not None:
            basis, owner = self.basis_builder()
        else:
            basis, owner = self._basis_from_characters()
        basis, owner = np.asarray(basis, dtype=np.float64), np.asarray(owner, dtype=np.int64)
        if basis.shape != (n, n) or not np.allclose(basis @ basis.T, np.eye(n), atol=1e-10):
            raise AssertionError(f"character table of {self.name} does not give an orthonormal basis")
        return basis, owner

    def _basis_from_characters(self) -> Tuple[np.ndarray, np.ndarray]:
        # The isotypic projector of irrep k on functions of G, P_k = (d_k / (|G| m_k)) sum_h chi_k(h) L_h
        # with (L_h f)(g) = f(h^-1 g), has the entries P_k[g, x] = c_k chi_k(g x^-1): an [|G|, |G|] gather
        # per irrep.  The P_k are orthogonal projectors summing to the identity, so one symmetric
        # eigendecomposition of sum_k (k + 1) P_k separates the components: eigenvalue k + 1 spans irrep k's.
        n = self.order
        gx = self.mul[:, self.inverse]                     # gx[g, x] = index of g x^-1
        weighted = np.zeros((n, n))
        for k, chi in enumerate(self.characters):
            # <chi, chi> is 1 for real irreps of real type and 2 for those of complex type.
            m = float(np.dot(chi, chi)) / n
            weighted += (k + 1) * (self.irrep_dims[k] / (n * m)) * chi[gx]
        w, v = np.linalg.eigh((weighted + weighted.T) / 2)
        label = np.rint(w).astype(np.int64) - 1
        if not np.allclose(w, label + 1, atol=1e-6) or label.min() < 0 or label.max() >= len(self.characters):
            raise AssertionError(f"character table of {self.name} does not give an orthonormal basis")
        rows, owner = [], []
        for k in range(len(self.characters)):
            sel = v[:, label == k].T
            if k == 0:
                sel = np.full((1, n), 1.0 / math.sqrt(n))  # exactly constant: the kernels skip row 0
            rows.append(sel)
            owner += [k] * sel.shape[0]
        return np.concatenate(rows, axis=0), np.asarray(owner, dtype=np.int64)

    @functools.cached_property
    def inverse(self) -> np.ndarray:
        return np.argmax(np.asarray(self.mul) == self.identity, axis=1)

    @functools.cached_property
    def identity(self) -> int:
        """Index of the identity element: 0 for C<N> and D<N>; 3 for the cube groups, whose element
        order is escnn's (its fourth element is the identity)."""
        rows = np.nonzero((np.asarray(self.mul) == np.arange(self.order)).all(axis=1))[0]
        if len(rows) != 1:
            raise AssertionError(f"multiplication table of {self.name} has no unique identity")
        return int(rows[0])

    def __repr__(self) -> str:
        return f"FiniteGroup({self.name}, order={self.order})"


# --- the kernel action (docs/design.md, Conventions) ------------------------------------------

def _rotation_flip_action(kernel: torch.Tensor, element: Tuple[int, int], n: int, ndim: int) -> torch.Tensor:
    """T_(f, j) = rotation r^j after reflection f, on the last ``ndim`` dims (0, 1 or 2)."""
    flip, rot = element
    if ndim == 0:
        return kernel
    out = torch.flip(kernel, [-1]) if flip else kernel
    if ndim == 1:
        # r^j acts on a line as the identity (2j/N even) or as a reversal (2j/N odd).
        return torch.flip(out, [-1]) if (2 * rot // n) % 2 == 1 else out
    return torch.rot90(out, k=rot * 4 // n, dims=(-2, -1))


def _make_action(ndim_fn):
    def action(kernel, element, n):
        return _rotation_flip_action(kernel, element, n, ndim_fn(kernel))
    return action


# --- C_N and D_N ------------------------------------------------------------------------------

def _cyclic_irreps(n: int):
    j = np.arange(n)
    names, dims, chars = [], [], []
    for k in range(n // 2 + 1):
        names.append(str(k))
        if k == 0:
            dims.append(1); chars.append(np.ones(n))
        elif 2 * k == n:
            dims.append(1); chars.append(np.cos(np.pi * j))
        else:
            # The real irrep of frequency k: k and -k together, of complex type.
            dims.append(2); chars.append(2 * np.cos(2 * np.pi * k * j / n))
    return names, dims, np.round(np.stack(chars), 15)


def _dihedral_irreps(n: int):
    """Real irreps of D_N in escnn's ``dihedral_group(N).irreps()`` order, named as there.

    escnn names irrep (j, k): j the reflection frequency, k the rotation frequency.  The order is
    (0,0), (1,0), then (1,k) for 0 < k < N/2, then for even N, (1,N/2) and (0,N/2).
    """
    j = np.tile(np.arange(n), 2)
    f = np.repeat(np.arange(2), n)
    names, dims, chars = [], [], []

    def add(jj, k, chi, d):
        names.append(f"irrep_{jj},{k}"); dims.append(d); chars.append(chi)

    add(0, 0, np.ones(2 * n), 1)
    add(1, 0, (-1.0) ** f, 1)
    for k in range(1, (n - 1) // 2 + 1):
        add(1, k, np.where(f == 0, 2 * np.cos(2 * np.pi * k * j / n), 0.0), 2)
    if n % 2 == 0:
        add(1, n // 2, (-1.0) ** (j + f), 1)
        add(0, n // 2, (-1.0) ** j, 1)
    return names, dims, np.round(np.stack(chars), 15)


def _frequency_rows(n: int, k: int, scale: float) -> np.ndarray:
    """[cos, sin] of frequency k on Z_n (0 < k < n/2), unit norm when scale = sqrt(2 / n) and n = |support|.
    The angle is reduced mod n in integers first, so large n lose no accuracy."""
    angle = 2 * np.pi * ((k * np.arange(n)) % n) / n
    return scale * np.stack([np.cos(angle), np.sin(angle)])


def _cyclic_basis(n: int):
    """The isotypic basis of C_N in closed form: the real DFT.  Irrep k (0 < k < N/2) owns cos and sin
    of frequency k, which span a translation-invariant plane; N/2 (even N) owns (-1)^j."""
    rows, owner = [np.full((1, n), 1 / math.sqrt(n))], [0]
    for k in range(1, (n - 1) // 2 + 1):
        rows.append(_frequency_rows(n, k, math.sqrt(2 / n)))
        owner += [k, k]
    if n % 2 == 0:
        rows.append(((-1.0) ** np.arange(n))[None] / math.sqrt(n))
        owner.append(n // 2)
    return np.concatenate(rows), np.asarray(owner, dtype=np.int64)


def _dihedral_basis(n: int):
    """The isotypic basis of D_N in closed form, rows in ``_dihedral_irreps`` order.

    A function on D_N is a pair (f(0, .), f(1, .)) of functions on Z_N.  Rotations translate both
    halves, the reflection swaps them and reverses j, so frequency k on either half stays frequency k:
    the 2-D irrep (1, k) owns the four functions cos / sin of frequency k on one half and zero on the
    other.  A 1-D irrep's component is spanned by its character."""
    j = np.tile(np.arange(n), 2)
    f = np.repeat(np.arange(2), n)
    unit = 1 / math.sqrt(2 * n)
    rows, owner = [np.full((1, 2 * n), unit), ((-1.0) ** f)[None] * unit], [0, 1]
    for k in range(1, (n - 1) // 2 + 1):
        cs = _frequency_rows(n, k, math.sqrt(2 / n))
        z = np.zeros_like(cs)
        rows += [np.concatenate([cs, z], axis=1), np.concatenate([z, cs], axis=1)]
        owner += [1 + k] * 4
    if n % 2 == 0:
        last = 1 + (n - 1) // 2
        rows += [((-1.0) ** (j + f))[None] * unit, ((-1.0) ** j)[None] * unit]
        owner += [last + 1, last + 2]
    return np.concatenate(rows), np.asarray(owner, dtype=np.int64)


def _kernel_ndim(kernel: torch.Tensor) -> int:
    # Weights are (out, in, *kernel); a size-1 kernel is kernel-free.
    spatial = kernel.shape[2:] if kernel.dim() > 2 else ()
    return 0 if all(s == 1 for s in spatial) else len(spatial)


@functools.lru_cache(maxsize=None)
def cyclic(n: int) -> FiniteGroup:
    if n < 1:
        raise ValueError(f"group: C<N> needs N >= 1, got N={n}")
    check_table_size(f"C{n}", n)
    elements = tuple((0, j) for j in range(n))
    j = np.arange(n)
    mul = (j[:, None] + j[None, :]) % n
    names, dims, chars = _cyclic_irreps(n)
    return FiniteGroup(f"C{n}", elements, mul, tuple(names), tuple(dims), chars, n, False,
                       _make_action(_kernel_ndim), basis_builder=functools.partial(_cyclic_basis, n))


@functools.lru_cache(maxsize=None)
def dihedral(n: int) -> FiniteGroup:
    if n < 1:
        raise ValueError(f"group: D<N> needs N >= 1, got N={n}")
    check_table_size(f"D{n}", 2 * n)
    elements = tuple((f, j) for f in range(2) for j in range(n))
    # (f1, j1)(f2, j2) = (f1 xor f2, j1 + (-1)^f1 j2 mod N), element (f, j) at index f N + j.
    f, j = np.repeat(np.arange(2), n), np.tile(np.arange(n), 2)
    mul = (f[:, None] ^ f[None, :]) * n + (j[:, None] + (1 - 2 * f[:, None]) * j[None, :]) % n
    names, dims, chars = _dihedral_irreps(n)
    return FiniteGroup(f"D{n}", elements, mul.astype(np.int64), tuple(names), tuple(dims), chars, n, True,
                       _make_action(_kernel_ndim), basis_builder=functools.partial(_dihedral_basis, n))


# --- the cube groups O, Oh and T (docs/design.md, Conventions) ---------------------------------
#
# Elements are rotation matrices on R^3 (signed permutation matrices), in escnn's element order for
# ``octaOnR3()`` / ``fullOctaOnR3()``, so that escnn's regular fields have the same channel layout.
# escnn lists O as scipy's ``Rotation.create_group('O')`` does: the 12 rotations of the tetrahedron
# inscribed in the cube first (the half turns about x, y, z, the identity, then the eight turns by
# 120 degrees about the body diagonals), then the 12 others.  The quaternions below (x, y, z, w)
# restate that order; the matrices follow from them.  T is the first 12 elements of O, in the same
# order.  Oh = O x {1, -1} (the point reflection -1 through the centre): element (f, j) is
# (-1)^f R_j, at index 24 f + j, escnn's direct-product order.

def _quaternion_matrix(q) -> np.ndarray:
    x, y, z, w = q
    m = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                  [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                  [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    r = np.rint(m)
    if not np.allclose(m, r, atol=1e-12):
        raise AssertionError(f"quaternion {q} is not a symmetry of the cube")
    return r.astype(np.int64)


@functools.lru_cache(maxsize=None)
def _octahedral_rotations() -> np.ndarray:
    """[24, 3, 3] rotation matrices of O in escnn's element order."""
    quats = [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]
    # The eight turns by 120 degrees: (1, sy, sz, sw) / 2, sw outermost, then sy, then sz, minus first.
    quats += [(0.5, 0.5 * sy, 0.5 * sz, 0.5 * sw) for sw in (1, -1) for sy in (-1, 1) for sz in (-1, 1)]
    c = math.sqrt(0.5)
    for q in [(1, 0, 0, 1), (0, 1, 0, 1), (0, 0, 1, 1), (0, 0, -1, 1), (0, -1, 0, 1), (-1, 0, 0, 1),
              (0, 1, 1, 0), (0, -1, 1, 0), (1, 0, 1, 0), (-1, 0, 1, 0), (1, 1, 0, 0), (-1, 1, 0, 0)]:
        quats.append(tuple(c * v for v in q))
    mats = np.stack([_quaternion_matrix(q) for q in quats])
    mats.setflags(write=False)
    return mats


def _cube_characters(mats: np.ndarray):
    """Per element: the trace t of its rotation part R, the sign s of the permutation of axes |R|, and
    the number n of axes |R| fixes.  They give every character of O: trivial 1, irrep_1 (R itself,
    escnn's Wigner-D of frequency 1) t, irrep_-1 t s, irrep_2 n - 1 (the permutation action on the
    three axes minus the trivial part), irrep_3 s."""
    rot = mats * np.linalg.det(mats).round().astype(np.int64)[:, None, None]  # the rotation part
    perm = np.abs(rot)
    t = np.trace(rot, axis1=1, axis2=2).astype(np.float64)
    s = np.linalg.det(perm).round()
    n = np.trace(perm, axis1=1, axis2=2).astype(np.float64)
    return t, s, n


def _matrix_table(mats: np.ndarray) -> np.ndarray:
    index = {m.tobytes(): i for i, m in enumerate(mats)}
    if len(index) != len(mats):
        raise AssertionError("repeated group element")
    return np.array([[index[(a @ b).tobytes()] for b in mats] for a in mats], dtype=np.int64)


def _cube_action(kernel: torch.Tensor, element: int, mats: np.ndarray) -> torch.Tensor:
    """T_g on the last three dims (kernel-free weights are left alone)."""
    spatial = kernel.shape[2:] if kernel.dim() > 2 else ()
    if all(s == 1 for s in spatial):
        return kernel
    if len(spatial) != 3:
        raise ValueError(f"group: the cube groups act on 3-D kernels, got a kernel of shape {tuple(spatial)}")
    # The grid point at array index u = (a, b, c) of the kernel dims (-3, -2, -1) is
    # (x, y, z) = M (u - o), o the centre: x along the last dim, y and z against the middle and first
    # dims (escnn's R3Conv grid).  In array coordinates g is the signed permutation A = M^T R M, and
    # T_g(W)[u] = W[o + A^-1 (u - o)]: flip the dims whose entry of A^-1 is -1, then permute the dims.
    a_inv = (_GRID.T @ mats[element] @ _GRID).T     # A^-1 = A^T: a signed permutation too
    # (A^-1 u')_i = +-u'_src[i]: the output's index in dim src[i] picks the input's index in dim i
    # (reversed where the sign is -1).  Flip those input dims, then move input dim i to place src[i],
    # which is permute() with the order argsort(src).
    src = np.abs(a_inv).argmax(axis=1)
    flips = [i - 3 for i in range(3) if a_inv[i, src[i]] < 0]
    out = torch.flip(kernel, flips) if flips else kernel
    lead = list(range(kernel.dim() - 3))
    return out.permute(lead + [len(lead) + int(d) for d in np.argsort(src)])


# (x, y, z) = _GRID @ (a - o, b - o, c - o) for the kernel dims (-3, -2, -1).
_GRID = np.array([[0, 0, 1], [0, -1, 0], [-1, 0, 0]], dtype=np.int64)


def _cube_group(name: str, mats: np.ndarray, elements, irreps, rotation_order: int, reflections: bool) -> FiniteGroup:
    mats = np.ascontiguousarray(mats)
    mats.setflags(write=False)
    names, dims, chars = zip(*irreps)

    index = {e: i for i, e in enumerate(elements)}

    def action(kernel, element, n):
        return _cube_action(kernel, index[element], mats)

    return FiniteGroup(name, tuple(elements), _matrix_table(mats), tuple(names), tuple(dims),
                       np.stack(chars).astype(np.float64), rotation_order, reflections, action, 3, mats)


def _octahedral_irreps(mats: np.ndarray):
    """(name, dim, character) of O's real irreps in escnn's ``octa_group().irreps()`` order."""
    t, s, n = _cube_characters(mats)
    return [("irrep_0", 1, np.ones(len(mats))), ("irrep_1", 3, t), ("irrep_-1", 3, t * s),
            ("irrep_2", 2, n - 1), ("irrep_3", 1, s)]


@functools.lru_cache(maxsize=None)
def octahedral() -> FiniteGroup:
    """O: the 24 rotations of the cube, in escnn's ``octaOnR3()`` element order."""
    mats = _octahedral_rotations()
    return _cube_group("O", mats, [(0, j) for j in range(24)], _octahedral_irreps(mats), 4, False)


@functools.lru_cache(maxsize=None)
def full_octahedral() -> FiniteGroup:
    """Oh: O and its products with the point reflection -1 (48 elements), escnn's ``fullOctaOnR3()``
    order: (f, j) = (-1)^f R_j at index 24 f + j.  Its irreps are escnn's too: for the reflection's
    irrep i in (0, 1) (outer) and O's irrep l (inner), ``irrep_[(i,),(l,)](0)`` with character
    (-1)^(i f) chi_l(j)."""
    rot = _octahedral_rotations()
    mats = np.concatenate([rot, -rot])
    flag = np.repeat([0, 1], 24)
    irreps = []
    for i in (0, 1):
        for name, dim, chi in _octahedral_irreps(rot):
            irreps.append((f"irrep_[({i},),({name[6:]},)](0)", dim, np.tile(chi, 2) * (-1.0) ** (i * flag)))
    return _cube_group("Oh", mats, [(f, j) for f in (0, 1) for j in range(24)], irreps, 4, True)


@functools.lru_cache(maxsize=None)
def tetrahedral() -> FiniteGroup:
    """T: the 12 rotations of the tetrahedron inscribed in the cube, the first 12 elements of O in O's
    order (escnn has no T on R^3; this is its subgroup of ``octaOnR3()``).  Real irreps, named after the
    irreps of O they come from: ``irrep_0`` (trivial), ``irrep_1`` (the rotation matrices, 3-D) and
    ``irrep_2`` (2-D, of complex type: the two conjugate 1-D complex irreps together)."""
    mats = _octahedral_rotations()[:12]
    t, s, n = _cube_characters(mats)
    irreps = [("irrep_0", 1, np.ones(12)), ("irrep_1", 3, t), ("irrep_2", 2, n - 1)]
    return _cube_group("T", mats, [(0, j) for j in range(12)], irreps, 3, False)


_CUBE_GROUPS = {"O": octahedral, "Oh": full_octahedral, "T": tetrahedral}
# The cube groups once built, by name: a plain dict, so that torch.compile, tracing the model-level
# functions that look a group up, reads the built group instead of inlining its construction (the
# tracer does not use functools.lru_cache's cache).
_CUBE_BUILT: dict = {}


def _cube_group_named(name: str) -> FiniteGroup:
    group = _CUBE_BUILT.get(name)
    if group is None:
        group = _CUBE_BUILT[name] = _CUBE_GROUPS[name]()
    return group


# Group names.  A built-in group is named exactly ``C<N>`` or ``D<N>`` (an upper-case letter and N
# in ASCII digits, N >= 1, no sign, leading zeros, spaces or other case) or exactly ``O``, ``Oh`` or
# ``T``.  One spelling per group keeps names usable as cache and table keys, and a typo ("c4", "C04",
# " C4", "oh", "OH", non-ASCII digits) fails loudly instead of quietly meaning another spelling's group.
_BUILTIN_RE = re.compile(r"([CD])([1-9][0-9]*)", re.ASCII)
# Names that look like a built-in spelled another way; reserved, so that no user group can take one.
_RESERVED_RE = re.compile(r"\s*(?:[CcDd]\s*[+-]?\s*\d+|[Oo]\s*[Hh]?|[Tt])\s*")
_ACCEPTED = ("'C<N>' (cyclic) or 'D<N>' (dihedral) with N >= 1 in ASCII digits, no leading zeros, "
             "spaces or lower case, e.g. 'C4', 'D8'; or 'O', 'Oh', 'T' (the cube's rotations, its rotations "
             "and reflections, the tetrahedron's rotations; for Conv3d)")

# Groups added with register_group, by name.  Process-local: the registry lives in this module, so a
# new process (a spawned DataLoader worker, multiprocessing, a restarted kernel) or a reload of
# projkernels.groups starts without them, and they must be registered again there.
_REGISTERED: dict = {}


def _is_builtin_name(name: str) -> bool:
    return name in _CUBE_GROUPS or _BUILTIN_RE.fullmatch(name) is not None


def register_group(group: FiniteGroup) -> FiniteGroup:
    """Make a user-defined group reachable by its name (the ops take groups by name).

    The registration is process-local and lasts until the process ends or ``projkernels.groups`` is
    reloaded: register the group again in every new process (DataLoader workers started with
    ``spawn``, multiprocessing, a restarted notebook kernel).  Passing the ``FiniteGroup`` object
    itself, instead of its name, to any projkernels function registers it on the way.
    """
    if not isinstance(group, FiniteGroup):
        raise TypeError(f"group: expected a FiniteGroup, got {type(group).__name__}")
    name = group.name
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"group: a registered group needs a non-empty name without surrounding spaces, "
                         f"got {short_repr(name)}")
    if _RESERVED_RE.fullmatch(name):
        raise ValueError(f"group: the name {short_repr(name)} is reserved for the built-in C<N> / D<N> / O / Oh / T; "
                         "pick another name")
    if _REGISTERED.get(name, group) is not group:
        # Tables are cached by name downstream: a second group under one name would read stale ones.
        raise ValueError(f"group: a different group is already registered as {short_repr(name)}; pick another name")
    _REGISTERED[name] = group
    return group


def group_name_for_ops(group, argument: str = "group") -> str:
    """The name the ops take for ``group`` (a name, checked, or a FiniteGroup, which gets registered)."""
    if isinstance(group, FiniteGroup):
        if _is_builtin_name(group.name):
            if get_group(group.name, argument) is not group:
                raise ValueError(f"{argument}: the name {short_repr(group.name)} is reserved for the built-in "
                                 "C<N> / D<N> / O / Oh / T")
        elif _REGISTERED.get(group.name) is not group:
            register_group(group)
        return group.name
    if isinstance(group, str) and (group in _REGISTERED or _is_builtin_name(group)):
        # A valid name passes through without building the group: this runs in the public functions,
        # which torch.compile traces, and the group tables are built inside the ops.
        return group
    return get_group(group, argument).name  # raises the TypeError / ValueError that fits


def get_group(group, argument: str = "group") -> FiniteGroup:
    """The ``FiniteGroup`` for a name (``"C4"``, ``"D8"``, ..., ``"O"``, ``"Oh"``, ``"T"`` or a registered
    name) or a ``FiniteGroup``.

    Raises TypeError for a non-string and ValueError for an unknown name, both starting with
    ``argument``; the ValueError lists the accepted forms and, for a name that is not a built-in,
    reminds that registered groups are process-local.
    """
    if isinstance(group, FiniteGroup):
        return group
    if not isinstance(group, str):
        raise TypeError(f"{argument}: expected a group name like 'C4', 'D4' or 'O' (str) or a FiniteGroup, "
                        f"got {type(group).__name__}")
    if group in _REGISTERED:
        return _REGISTERED[group]
    if group in _CUBE_GROUPS:
        return _cube_group_named(group)
    m = _BUILTIN_RE.fullmatch(group)
    if m is not None:
        n = int(m.group(2))
        return cyclic(n) if m.group(1) == "C" else dihedral(n)
    if re.fullmatch(r"[CD]0+", group):
        raise ValueError(f"{argument}: {short_repr(group)} has no elements; C<N> and D<N> need N >= 1")
    if _RESERVED_RE.fullmatch(group):
        raise ValueError(f"{argument}: {short_repr(group)} is not a group name; expected {_ACCEPTED} (names are "
                         "matched exactly, without normalising case, spaces, zeros or digits)")
    registered = ", ".join(short_repr(k, 40) for k in sorted(_REGISTERED)[:20]) or "none"
    if len(_REGISTERED) > 20:
        registered += f", ... ({len(_REGISTERED)} in all)"
    raise ValueError(f"{argument}: unknown group {short_repr(group)}; expected {_ACCEPTED}, or the name of a group "
                     f"registered with register_group in this process (registered now: {registered}; "
                     "registrations are process-local: register the group again after a restart, a reload "
                     "of projkernels.groups, or in a new worker process)")


def irrep_names(group) -> Tuple[str, ...]:
    """Names of the real irreps, in the order of ``spectrum``'s entries."""
    return get_group(group).irrep_names
