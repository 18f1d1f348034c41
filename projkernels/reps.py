"""Field types: representations whose matrices rho(g) are signed permutations.

A field of size n carries a representation given as two [|G|, n] arrays: rho(g) e_a =
sign[g, a] e_{perm[g, a]} (one entry, +1 or -1, in each row and column of every matrix).
``trivial`` (n = 1, the identity) and ``regular`` (n = |G|, rho(g) e_h = e_{g h}) are two of them;
the others are escnn's irreps that are signed permutations (the 2-D vector rep of C4 and D4, the
1-D sign reps, the 3-D vector rep of the cube groups and its products with 1-D reps), escnn's
quotient reps (permutations of cosets), and the reps a user registers with ``register_rep``.

The matrices are written in closed form here, in escnn's bases (tests/test_signed_fields.py checks
them against escnn's own groups), so nothing at run time needs escnn.

A side of a layer (``in_rep`` / ``out_rep``) is either one name, meaning C copies of that field with
C taken from the weight's shape, or a list / tuple of names, exactly that direct sum in escnn's
``FieldType`` order (channel index = the field's running offset + component).  A direct sum of
different fields acts as one field (its block-diagonal rep); ``[name] * C`` is C copies.  Direct
sums travel through the ops (which take representations as strings) in the canonical form
``"(name + name + ...)"`` (escnn's names hold brackets and commas, never a plus).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from .groups import FiniteGroup, get_group, short_repr

__all__ = ["SignedRep", "register_rep", "rep_names", "field_rep", "canonical_rep", "side_of", "Side"]


@dataclass(frozen=True, eq=False)
class SignedRep:
    """rho(g) e_a = sign[g, a] e_{perm[g, a]} for g in element order."""
    name: str
    perm: np.ndarray  # [|G|, n] int64
    sign: np.ndarray  # [|G|, n] int64, +1 or -1

    @property
    def size(self) -> int:
        return self.perm.shape[1]

    @property
    def signed(self) -> bool:
        return bool((self.sign < 0).any())

    def matrices(self) -> np.ndarray:
        """[|G|, n, n] float64 rho(g)."""
        n_g, n = self.perm.shape
        m = np.zeros((n_g, n, n))
        g = np.repeat(np.arange(n_g), n)
        a = np.tile(np.arange(n), n_g)
        m[g, self.perm.reshape(-1), a] = self.sign.reshape(-1)
        return m

    def fixed_space(self) -> np.ndarray:
        """[n, d] orthonormal basis of {v : rho(g) v = v for all g} (the equivariant biases)."""
        avg = self.matrices().mean(axis=0)
        u, s, _ = np.linalg.svd(avg)
        return u[:, s > 0.5]  # avg is an orthogonal projector: singular values 0 or 1


def _from_matrices(name: str, mats: np.ndarray, argument: str = "matrices") -> SignedRep:
    mats = np.asarray(mats, dtype=np.float64)
    if mats.ndim != 3 or mats.shape[1] != mats.shape[2] or mats.shape[1] == 0:
        raise ValueError(f"{argument}: expected |G| square matrices, an array of shape (|G|, n, n), got shape "
                         f"{mats.shape}")
    r = np.rint(mats)
    nz = r != 0
    if (not np.allclose(mats, r, atol=1e-6) or not np.isin(r, (-1.0, 0.0, 1.0)).all()
            or not (nz.sum(axis=1) == 1).all() or not (nz.sum(axis=2) == 1).all()):
        bad = int(np.nonzero(~((nz.sum(axis=1) == 1).all(axis=1) & (nz.sum(axis=2) == 1).all(axis=1)
                               & np.isclose(mats, r, atol=1e-6).all(axis=(1, 2))
                               & np.isin(r, (-1.0, 0.0, 1.0)).all(axis=(1, 2))))[0][:1].tolist()[0]) \
            if mats.shape[0] else 0
        raise ValueError(f"{argument}: every rho(g) must be a signed permutation matrix (one entry +1 or -1 in "
                         f"each row and column, zeros elsewhere); matrix {bad} is not")
    perm = np.argmax(nz, axis=1)                                   # [G, n]: the row of column a's entry
    sign = np.take_along_axis(r, perm[:, None, :], axis=1)[:, 0, :]
    return SignedRep(name, perm.astype(np.int64), sign.astype(np.int64))


def _check_homomorphism(group: FiniteGroup, rep: SignedRep, argument: str) -> None:
    """rho(g) rho(h) = rho(g h) for all g, h, on the (perm, sign) form: |G|^2 n steps."""
    mul = np.asarray(group.mul, dtype=np.int64)
    p, s = rep.perm, rep.sign
    # rho(g) rho(h) e_a = s[h, a] s[g, p[h, a]] e_{p[g, p[h, a]]}
    comp_p = np.take_along_axis(p[:, None, :].repeat(len(p), 1), p[None].repeat(len(p), 0), axis=2)
    comp_s = np.take_along_axis(s[:, None, :].repeat(len(p), 1), p[None].repeat(len(p), 0), axis=2) * s[None]
    if not (np.array_equal(comp_p, p[mul]) and np.array_equal(comp_s, s[mul])):
        g, h = [int(v[0]) for v in np.nonzero(~((comp_p == p[mul]).all(axis=2) & (comp_s == s[mul]).all(axis=2)))]
        raise ValueError(f"{argument}: the matrices are not a representation of {group.name}: "
                         f"rho({g}) rho({h}) != rho({int(mul[g, h])}) (element {int(mul[g, h])} = {g} * {h} in "
                         "the group's multiplication table)")


# --- built-in reps ------------------------------------------------------------------------------

def _rot2(k: np.ndarray, n: int) -> np.ndarray:
    """[len(k), 2, 2] rotations by 2 pi k / n, rounded (only called where they are signed permutations)."""
    a = 2 * np.pi * (k % n) / n
    c, s = np.cos(a), np.sin(a)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def _is_signed_perm(mats: np.ndarray) -> bool:
    r = np.rint(mats)
    return bool(np.allclose(mats, r, atol=1e-9) and (np.abs(r).sum(axis=1) == 1).all()
                and (np.abs(r).sum(axis=2) == 1).all())


def _quotient(group: FiniteGroup, subgroup) -> np.ndarray:
    """The permutation rep on the cosets g H, cosets ordered by their first element (escnn's order), in
    permutation form [|G|, n] (never as |G| dense n x n matrices: C512's C512/C1 alone would be 1 GiB)."""
    mul = np.asarray(group.mul, dtype=np.int64)
    sub = np.asarray(sorted(subgroup), dtype=np.int64)
    coset_of = np.full(group.order, -1, dtype=np.int64)
    n = 0
    for g in range(group.order):
        if coset_of[g] < 0:
            coset_of[mul[g, sub]] = n
            n += 1
    first = np.array([int(np.nonzero(coset_of == c)[0][0]) for c in range(n)])
    return coset_of[mul[:, first]]                # [|G|, n]: g . (first[c] H) = coset of g first[c]


def _planar_reps(group: FiniteGroup) -> Dict[str, np.ndarray]:
    """C<N> / D<N>: escnn's irreps (``cyclic_group(N).irreps()``, ``dihedral_group(N).irreps()``), as
    [|G|, n, n] matrices (the caller keeps those that are signed permutations), and quotient reps in
    permutation form [|G|, n]."""
    n = group.rotation_order
    f = np.array([e[0] for e in group.elements])
    j = np.array([e[1] for e in group.elements])
    out: Dict[str, np.ndarray] = {}
    if not group.has_reflections:
        for k in range(1, n // 2 + 1):
            if 2 * k == n:
                out[f"irrep_{k}"] = ((-1.0) ** j)[:, None, None]
            else:
                out[f"irrep_{k}"] = _rot2(k * j, n)
        for m in range(1, n + 1):
            if n % m == 0 and m < n:  # the subgroup C_m = {r^(j n / m)}; escnn's id is m
                out[f"quotient[{m}]"] = _quotient(group, [i for i, e in enumerate(group.elements) if e[1] % (n // m) == 0])
    else:
        flip = np.where(f == 1, -1.0, 1.0)
        out["irrep_1,0"] = flip[:, None, None]
        for k in range(1, (n - 1) // 2 + 1):
            refl = np.stack([np.eye(2), np.diag([1.0, -1.0])])[f]
            out[f"irrep_1,{k}"] = _rot2(k * j, n) @ refl
        if n % 2 == 0:
            out[f"irrep_1,{n // 2}"] = ((-1.0) ** (j + f))[:, None, None]
            out[f"irrep_0,{n // 2}"] = ((-1.0) ** j)[:, None, None]
        for m in range(1, n + 1):
            if n % m:
                continue
            rot = [i for i, e in enumerate(group.elements) if e[0] == 0 and e[1] % (n // m) == 0]
            out[f"quotient[(None, {m})]"] = _quotient(group, rot)
            if m < n:
                # D_m with its reflection axis at angle 0: the rotations above and the flips (1, j n / m).
                dm = rot + [i for i, e in enumerate(group.elements) if e[0] == 1 and e[1] % (n // m) == 0]
                out[f"quotient[(0, {m})]"] = _quotient(group, dm)
    return out


# escnn writes the frequency-1 Wigner-D matrices of the cube groups in the basis (y, z, x).
_YZX = [1, 2, 0]


def _cube_reps(group: FiniteGroup) -> Dict[str, np.ndarray]:
    """O / Oh / T: the 3-D vector rep R_g (escnn's ``irrep_1``, basis (y, z, x)) and its products with the
    1-D reps that are signed permutations: the determinant (Oh) and the sign s of the permutation of the
    cube's axes (escnn's ``irrep_-1`` = s R, ``irrep_3`` = s of O)."""
    mats = group.matrices.astype(np.float64)
    det = np.rint(np.linalg.det(mats))
    rot = mats * det[:, None, None]
    s = np.rint(np.linalg.det(np.abs(rot)))
    R = mats[:, _YZX][:, :, _YZX]
    one = lambda v: v[:, None, None]  # noqa: E731
    if group.name == "T":
        return {"irrep_1": R}
    if group.name == "O":
        return {"irrep_1": R, "irrep_-1": R * one(s), "irrep_3": one(s)}
    if group.name == "Oh":
        out = {}
        for i, sgn in ((0, det), (1, np.ones_like(det))):
            # irrep_[(i,),(l,)](0) has character (-1)^(i f) chi_l: (-1)^f = det, and R_g = (-1)^f R_j.
            pre = f"irrep_[({i},),"
            out[pre + "(1,)](0)"] = R * one(sgn)
            out[pre + "(-1,)](0)"] = R * one(sgn * s)
            out[pre + "(3,)](0)"] = one(s * (det if i == 1 else np.ones_like(det)))
        out["irrep_[(1,),(0,)](0)"] = one(det)
        return out
    return {}


# Friendly names beside escnn's, per group family: alias -> escnn name, where the meaning is unambiguous.
def _aliases(group: FiniteGroup, names) -> Dict[str, str]:
    out = {}
    if group.kernel_ndim == 2 and group.rotation_order == 4:
        if group.has_reflections:
            out.update(vector="irrep_1,1", pseudoscalar="irrep_1,0")
        else:
            out.update(vector="irrep_1", sign="irrep_2")
    if group.name in ("O", "T"):
        out["vector"] = "irrep_1"
    if group.name == "Oh":
        out.update(vector="irrep_[(1,),(1,)](0)", pseudovector="irrep_[(0,),(1,)](0)",
                   pseudoscalar="irrep_[(1,),(0,)](0)")
    return {k: v for k, v in out.items() if v in names}


@functools.lru_cache(maxsize=None)
def _builtin(group: FiniteGroup) -> Tuple[Dict[str, SignedRep], Dict[str, str]]:
    n = group.order
    reps: Dict[str, SignedRep] = {
        "trivial": SignedRep("trivial", np.zeros((n, 1), dtype=np.int64), np.ones((n, 1), dtype=np.int64)),
        "regular": SignedRep("regular", np.asarray(group.mul, dtype=np.int64), np.ones((n, n), dtype=np.int64)),
    }
    if group.matrices is not None:
        mats = _cube_reps(group)
    elif group.name[:1] in "CD" and group.name[1:].isdigit():
        mats = _planar_reps(group)
    else:
        mats = {}
    for name, m in mats.items():
        if m.ndim == 2:  # a permutation rep in permutation form (the quotients)
            reps[name] = SignedRep(name, m.astype(np.int64), np.ones_like(m, dtype=np.int64))
        elif _is_signed_perm(m):
            reps[name] = _from_matrices(name, m)
    aliases = _aliases(group, reps)
    # escnn's names of the trivial irrep.
    aliases.update({"irrep_0": "trivial", "irrep_0,0": "trivial"} if group.kernel_ndim == 2 else {})
    if group.name == "Oh":
        aliases["irrep_[(0,),(0,)](0)"] = "trivial"
    elif group.matrices is not None:
        aliases["irrep_0"] = "trivial"
    return reps, aliases


# Reps added with register_rep, by (group name, rep name).  Process-local, like registered groups.
_REGISTERED: Dict[Tuple[str, str], SignedRep] = {}


def register_rep(group, name: str, matrices) -> SignedRep:
    """Register a field type of ``group`` by its |G| matrices rho(g), in the group's element order.

    The matrices must be signed permutation matrices (one entry +1 or -1 in each row and column) and
    a representation: rho(g) rho(h) = rho(g h) under the group's multiplication table; both are
    checked.  Afterwards ``name`` is usable as ``in_rep`` / ``out_rep`` (and inside direct sums) with
    this group everywhere a built-in name is.  Process-local, like ``register_group``.
    """
    g = get_group(group)
    if not isinstance(name, str) or not name or name != name.strip() or "+" in name or name.startswith("("):
        raise ValueError(f"name: expected a non-empty name without surrounding spaces, '+' or a leading '(', got "
                         f"{short_repr(name)}")
    builtin, aliases = _builtin(g)
    if name in builtin or name in aliases:
        raise ValueError(f"name: {name!r} is a built-in field type of {g.name}; pick another name")
    mats = np.asarray(matrices, dtype=np.float64)
    if mats.ndim != 3 or mats.shape[0] != g.order:
        raise ValueError(f"matrices: expected {g.order} matrices (one per element of {g.name}), an array of "
                         f"shape ({g.order}, n, n), got shape {mats.shape}")
    rep = _from_matrices(name, mats)
    _check_homomorphism(g, rep, "matrices")
    old = _REGISTERED.get((g.name, name))
    if old is not None and not (np.array_equal(old.perm, rep.perm) and np.array_equal(old.sign, rep.sign)):
        raise ValueError(f"name: a different field type {name!r} of {g.name} is already registered; pick another name")
    _REGISTERED[(g.name, name)] = rep
    _canonical_cached.cache_clear()
    return rep


def rep_names(group) -> Tuple[str, ...]:
    """The field type names usable with ``group``: built-in (escnn's names, then the aliases) and registered."""
    g = get_group(group)
    builtin, aliases = _builtin(g)
    return tuple(builtin) + tuple(aliases) + tuple(n for (gn, n) in _REGISTERED if gn == g.name)


def field_rep(group: FiniteGroup, name: str, argument: str = "rep") -> SignedRep:
    """The rep called ``name`` (a built-in, an alias or a registered name) of ``group``."""
    builtin, aliases = _builtin(group)
    rep = builtin.get(aliases.get(name, name))
    if rep is None:
        rep = _REGISTERED.get((group.name, name))
    if rep is None:
        known = ", ".join(repr(n) for n in rep_names(group))
        raise ValueError(f"{argument}: unknown representation {short_repr(name)} of {group.name}; expected one of "
                         f"{known}, a list of them (a direct sum), or a name registered with register_rep")
    return rep


def _split(text: str):
    """The names of a canonical direct sum ``"(a + b)"``, or None for a single name."""
    if text.startswith("(") and text.endswith(")"):
        return [s.strip() for s in text[1:-1].split("+")]
    return None


def canonical_rep(rep, argument: str = "rep") -> str:
    """A side's description as the string the ops take: a name stays, a list / tuple of names becomes
    ``"(a + b + ...)"``.  Only the types are checked here; the names are checked against the group later."""
    if isinstance(rep, str):
        return rep
    if isinstance(rep, (list, tuple)):
        if not rep:
            raise ValueError(f"{argument}: a direct sum needs at least one field, got an empty {type(rep).__name__}")
        for i, r in enumerate(rep):
            if not isinstance(r, str):
                raise TypeError(f"{argument}[{i}]: expected a field type name (str), got {type(r).__name__}")
            if "+" in r or r.startswith("("):
                raise ValueError(f"{argument}[{i}]: a field type name has no '+' and no leading '(', got {short_repr(r)}")
        return "(" + " + ".join(rep) + ")"
    raise TypeError(f"{argument}: expected a field type name like 'trivial', 'regular' or 'vector' (str), or a "
                    f"list of names (a direct sum), got {type(rep).__name__}")


@dataclass(frozen=True, eq=False)
class Side:
    """One side of a layer: ``count`` copies (None: as many as the weight holds) of the field ``rep``."""
    text: str          # the canonical string
    rep: SignedRep
    count: object      # int, or None for "C copies, C from the weight"

    @property
    def size(self) -> int:
        return self.rep.size


@functools.lru_cache(maxsize=1024)
def _canonical_cached(group: FiniteGroup, text: str, argument: str) -> Side:
    names = _split(text)
    if names is None:
        return Side(text, field_rep(group, text, argument), None)
    if not names or any(not n for n in names):
        raise ValueError(f"{argument}: malformed direct sum {short_repr(text)}; expected '(name + name + ...)'")
    reps = [field_rep(group, n, f"{argument}[{i}]") for i, n in enumerate(names)]
    if all(r is reps[0] for r in reps):
        return Side(text, reps[0], len(reps))
    # The block-diagonal rep: field i occupies components [off_i, off_i + size_i).
    offs = np.cumsum([0] + [r.size for r in reps])
    perm = np.concatenate([r.perm + o for r, o in zip(reps, offs[:-1])], axis=1)
    sign = np.concatenate([r.sign for r in reps], axis=1)
    return Side(text, SignedRep(text, perm, sign), 1)


def side_of(group: FiniteGroup, rep, argument: str = "rep") -> Side:
    """The side described by ``rep`` (a name, a list of names or the canonical string of one)."""
    return _canonical_cached(group, canonical_rep(rep, argument), argument)

