"""Orbit tables: the one description of a weight's group action that every backend consumes.

Every Pi_g (the group action on weights, docs/design.md, Conventions) permutes the entries of W, and it never mixes fields: it acts
inside each (out-field, in-field) block of shape (field_out, field_in, *kernel).  So the orbits of
one block, listed once, describe all blocks.  For each orbit we store the |G| entries
``g . e`` for g in element order (e its smallest entry).  For C_N that list is the orbit's cycle
r^0 e, r^1 e, ... repeated |Stab| times; in general every orbit entry appears |Stab| times.  With
that uniform width, per orbit O and f(g) = W[g . e]:

    mean_O        = mean_g f(g)
    penalty part  = (1/|Stab|) sum_g (f(g) - mean_O)^2          = sum_{x in O} (W_x - mean_O)^2
    energy part   = (|G|/|Stab|) mean_O^2                         = |O| mean_O^2
    spectrum part = (1/|Stab|) sum_{rows r of irrep rho} (basis[r] . f)^2

which is the orbit model of docs/design.md with no per-size special cases.  Offsets are stored relative to the
block's first entry in a contiguous weight, so a kernel reads entry ``block_base + offsets[o, g]``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .groups import FiniteGroup, get_group, short_repr
from .reps import Side, side_of

__all__ = ["OrbitTable", "DeviceTables", "orbit_table", "REPS", "field_size"]

REPS = ("trivial", "regular")


def field_size(rep, group: FiniteGroup) -> int:
    """The size of one field of ``rep`` (a name or a direct sum, projkernels/reps.py)."""
    if rep == "trivial":
        return 1
    if rep == "regular":
        return group.order
    return side_of(group, rep).size


def _check_rep(group: FiniteGroup, name: str, rep):
    return side_of(group, rep, name)


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_weight(weight) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in WEIGHT_DTYPES:
        # float8 and complex weights included: no backend computes in them, and a reference route that
        # upcast them would report a penalty of values the layer never uses.
        raise TypeError(f"weight: expected a floating dtype (float16, bfloat16, float32 or float64), got {weight.dtype}; "
                        "convert it first (weight.float())")
    if weight.layout != torch.strided:
        raise TypeError(f"weight: expected a dense (strided) tensor, got layout {weight.layout}; "
                        "convert it first (weight.to_dense())")
    if weight.dim() not in (2, 3, 4, 5):
        raise ValueError(
            "weight: expected shape (out, in) for Linear, (out, in, k) for Conv1d, (out, in, kh, kw) for "
            f"Conv2d or (out, in, kd, kh, kw) for Conv3d, got {tuple(weight.shape)} ({weight.dim()} dims)")


_LAYER = {1: "Conv1d", 2: "Conv2d", 3: "Conv3d"}


def _check_action(group: FiniteGroup, shape: Tuple[int, ...]) -> None:
    kernel = shape[2:]
    if all(k == 1 for k in kernel):
        return  # kernel-free: any group
    size = "x".join(map(str, kernel))
    if group.kernel_ndim == 3:
        # The cube groups permute the axes of a cubic kernel: exact for every size k.
        if len(kernel) != 3:
            raise ValueError(
                f"group: {group.name} acts on 3-D kernels (Conv3d weights (out, in, k, k, k)) and on kernel-free "
                f"weights; weight has shape {tuple(shape)}, a {size} {_LAYER[len(kernel)]} kernel (use C<N> / D<N> "
                "for 1-D and 2-D kernels)")
        if len(set(kernel)) != 1:
            raise ValueError(
                f"weight: {group.name} permutes the kernel's axes, so the kernel must be a cube (k x k x k); "
                f"got a {size} kernel (weight shape {tuple(shape)})")
        return
    if len(kernel) == 3:
        raise ValueError(
            f"group: {group.name} acts on 1-D and 2-D kernels; weight has shape {tuple(shape)}, a {size} Conv3d "
            "kernel: use 'O', 'Oh' or 'T' for 3-D kernels (or a 1x1x1 kernel)")
    n = group.rotation_order
    if len(kernel) == 1:
        if n not in (1, 2):
            raise ValueError(
                f"group: {group.name} does not act exactly on a 1-D kernel of size {kernel[0]} "
                f"(weight shape {tuple(shape)}); 1-D kernels allow C1, C2, D1, D2, or a kernel of size 1")
        return
    kh, kw = kernel
    if n not in (1, 2, 4):
        raise ValueError(
            f"group: {group.name} does not act exactly on a {kh}x{kw} kernel (weight shape {tuple(shape)}); "
            "2-D kernels on the square grid allow N in {1, 2, 4} (C1, C2, C4, D1, D2, D4), or a 1x1 kernel")
    if n > 1 and kh != kw:
        raise ValueError(
            f"weight: {group.name} rotates the kernel, so it must be square; got a {kh}x{kw} kernel "
            f"(weight shape {tuple(shape)})")


@dataclass(frozen=True, eq=False)
class OrbitTable:
    group: FiniteGroup
    shape: Tuple[int, ...]      # the weight's shape
    field_out: int              # size of one output field
    field_in: int
    c_out: int                  # number of fields
    c_in: int
    offsets: torch.Tensor       # [orbits per block, |G|] int64, relative to the block's first entry
    inv_stab: torch.Tensor      # [orbits per block] float64, 1/|Stab| = |O|/|G|
    stride_out: int             # distance between blocks of consecutive out-fields
    stride_in: int              # distance between blocks of consecutive in-fields
    in_rep: str = "trivial"     # the sides as the ops take them (projkernels/reps.py, canonical strings)
    out_rep: str = "trivial"
    # Whether an offset is negative (o < 0: the entry is -W[base + ~o], a field whose rho(g) are signed
    # permutations): the kernels read signs only for such tables, trivial and regular fields never have one.
    signed: bool = False

    @property
    def n_blocks(self) -> int:
        return self.c_out * self.c_in

    @property
    def orbits_per_block(self) -> int:
        return self.offsets.shape[0]

    @property
    def n_orbits(self) -> int:
        return self.n_blocks * self.orbits_per_block

    def block_bases(self) -> torch.Tensor:
        fo = torch.arange(self.c_out, dtype=torch.int64)[:, None]
        fi = torch.arange(self.c_in, dtype=torch.int64)[None, :]
        return (fo * self.stride_out + fi * self.stride_in).reshape(-1)

    @functools.cached_property
    def entry_offsets(self) -> torch.Tensor:
        """[orbits per block, |G|] the offsets with their signs removed (~o for o < 0)."""
        return torch.where(self.offsets < 0, ~self.offsets, self.offsets) if self.signed else self.offsets

    @functools.cached_property
    def offset_signs(self) -> Optional[torch.Tensor]:
        """[orbits per block, |G|] int64 +1 / -1, the sign s(g, e) of each entry; None when unsigned."""
        return torch.where(self.offsets < 0, -1, 1) if self.signed else None

    @functools.cached_property
    def gather_index(self) -> torch.Tensor:
        """[n_orbits, |G|] flat indices into the contiguous weight (the Python routes; signs: ``gather_signs``)."""
        return (self.block_bases()[:, None, None] + self.entry_offsets[None]).reshape(-1, self.group.order)

    @functools.cached_property
    def gather_signs(self) -> Optional[torch.Tensor]:
        """[n_orbits, |G|] +1 / -1 matching ``gather_index`` (f[g] = sign * W[index]); None when unsigned."""
        if not self.signed:
            return None
        return self.offset_signs[None].expand(self.n_blocks, -1, -1).reshape(-1, self.group.order)

    @property
    def geometry(self) -> List[int]:
        """[n_irreps, c_out, c_in, stride_out, stride_in, signed], the int arguments of the public ops
        (``geometry[1:]`` is a layer's entry in the multi-tensor ops' geometry)."""
        return [len(self.group.irrep_names), self.c_out, self.c_in, self.stride_out, self.stride_in, int(self.signed)]

    def device_tables(self, device, dtype: torch.dtype = torch.float32, *, spectrum: bool = True) -> "DeviceTables":
        """The table on ``device`` in the form the compiled ops read it, for weights of ``dtype``.

        Built (one upload) on first use per (device, accumulation dtype), then cached on the
        table: the hot path never copies a table again.  The contents were validated when the table
        was built, so the ops only check shapes and devices.

        ``spectrum=False`` is for the calls that never read the isotypic basis (penalty, energy,
        projection, gradients): its ``basis`` and ``row_irrep`` are stand-ins of the right shapes (the basis
        occupies no memory), so the group's basis is not built.  The basis is NaN there, so a spectrum
        computed from these tables by mistake comes out NaN rather than plausible.  Both forms share
        the offsets and the other tensors.
        """
        acc = acc_dtype(dtype)
        dev = str(torch.device(device))
        cache = self.__dict__.setdefault("_device_cache", {})
        key = (dev, acc, spectrum)
        if key in cache:
            return cache[key]
        base = cache.get((dev, acc, False))
        if base is None:
            G = self.group.order
            base = cache[(dev, acc, False)] = DeviceTables(
                offsets=self.offsets.to(device=device, dtype=torch.int32).contiguous(),
                inv_stab=self.inv_stab.to(device=device, dtype=torch.float64).contiguous(),
                basis=torch.full((), float("nan"), dtype=torch.float64, device=device).expand(G, G),
                # Contiguous (|G| entries): the ops' checks read row_irrep in place, an expanded one would be copied.
                row_irrep=torch.zeros(G, dtype=torch.int64, device=device),
                zero=torch.zeros((), dtype=acc, device=device),
                half=torch.full((), 0.5, dtype=acc, device=device),
            )
        if spectrum:
            basis, row_irrep = self.group.isotypic_basis
            base = cache[key] = base._replace(
                basis=torch.as_tensor(basis, dtype=torch.float64).to(device).contiguous(),
                row_irrep=torch.as_tensor(row_irrep, dtype=torch.int64).to(device).contiguous())
        return base


class DeviceTables(NamedTuple):
    """An orbit table on one device; the list form is the ``table`` argument of the public ops."""
    offsets: torch.Tensor    # [orbits per block, |G|] int32
    inv_stab: torch.Tensor   # [orbits per block] float64
    basis: torch.Tensor      # [|G|, |G|] float64, the isotypic basis (spectrum only; a NaN stand-in without it)
    row_irrep: torch.Tensor  # [|G|] int64, the irrep of each basis row (zeros without the spectrum)
    zero: torch.Tensor       # 0-dim, accumulation dtype: the gradient of an unused output
    half: torch.Tensor       # 0-dim, accumulation dtype: P(W) = backward(0, 1/2)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and result) dtype for weights of ``dtype``: float64 stays float64, float32
    and the half types accumulate in float32 (a small penalty is not rounded away).  The one place
    this rule is written in Python; the C++ side has ``acc_type_of`` in csrc/include/op_checks.h."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_permutations(group: FiniteGroup, kernel: Tuple[int, ...]) -> np.ndarray:
    """tau[g, x]: where T_g moves the kernel entry x (flat index)."""
    k = int(np.prod(kernel)) if kernel else 1
    if k == 1:
        return np.zeros((group.order, 1), dtype=np.int64)  # kernel-free: every T_g is the identity
    probe = torch.arange(k).reshape((1, 1) + tuple(kernel))
    moved = np.stack([group.kernel_action(probe, g).reshape(-1).numpy() for g in range(group.order)])
    tau = np.empty((group.order, k), dtype=np.int64)
    np.put_along_axis(tau, moved, np.broadcast_to(np.arange(k), moved.shape), axis=1)
    return tau


def _channel_action(side: Side) -> Tuple[np.ndarray, np.ndarray]:
    """(pi, sign) [|G|, field size]: rho(g) e_a = sign[g, a] e_{pi[g, a]} (regular: a -> g a, sign 1)."""
    return side.rep.perm, side.rep.sign


# Elements per chunk when comparing [chunk, |G|, k] compositions: bounds the check's memory.
_CHECK_CHUNK = 1 << 22


def _check_kernel_action(group: FiniteGroup, tau: np.ndarray, shape: Tuple[int, ...]) -> None:
    """tau[g h] = tau[g] o tau[h] for all g, h: T is an action compatible with the multiplication table.

    |G|^2 * k comparisons, vectorised in chunks of g; k > 1 only happens for the small groups that act
    on kernels (a kernel-free tau is the identity and needs no check)."""
    n, k = tau.shape
    if k == 1:
        return
    mul = np.asarray(group.mul, dtype=np.int64)
    step = max(1, _CHECK_CHUNK // (n * k))
    for g0 in range(0, n, step):
        g = np.arange(g0, min(n, g0 + step))
        lhs = tau[mul[g]]                                           # [c, |G|, k]: tau[g h]
        rhs = np.take_along_axis(tau[g][:, None, :].repeat(n, 1), tau[None].repeat(len(g), 0), axis=2)
        if not np.array_equal(lhs, rhs):
            raise AssertionError(f"kernel action of {group.name} on shape {shape} is not a group action")


@functools.lru_cache(maxsize=None)
def _check_regular_action(group: FiniteGroup) -> None:
    """rho(g) rho(h) = rho(g h) for the regular representation, i.e. ``mul`` is a group law.

    Checked once per group (cached on it) in |G|^2 * (number of generators) steps, not |G|^3: each row of
    ``mul`` must be a permutation, and associativity need only hold with a generator in the middle
    (Light's test: the middle elements for which (x a) y = x (a y) for all x, y form a closed set, so
    holding on a generating set it holds for all)."""
    mul = np.asarray(group.mul, dtype=np.int64)
    n = group.order
    ok = mul.shape == (n, n) and mul.min() >= 0 and mul.max() < n
    ok = ok and (np.sort(mul, axis=1) == np.arange(n)).all() and (np.sort(mul, axis=0) == np.arange(n)[:, None]).all()
    if ok:
        e = group.identity  # raises when there is none
        ok = (mul[e] == np.arange(n)).all() and (mul[:, e] == np.arange(n)).all()
    if ok:
        # A generating set, greedily: each new generator lies outside the span of the ones before.
        span = np.zeros(n, dtype=bool)
        span[e] = True
        gens = []
        while not span.all():
            a = int(np.argmin(span))
            gens.append(a)
            frontier = np.nonzero(span)[0]
            while len(frontier):  # close the span under right multiplication by the generators
                new = np.unique(mul[frontier][:, gens].reshape(-1))
                new = new[~span[new]]
                span[new] = True
                frontier = new
        for a in gens:
            # (x a) y == x (a y) for all x, y
            if not np.array_equal(mul[mul[:, a]], np.take_along_axis(mul, np.broadcast_to(mul[a], (n, n)), axis=1)):
                ok = False
                break
    if not ok:
        raise AssertionError(f"multiplication table of {group.name} is not a group law, so its regular "
                             "representation is not a representation")


# Entries per step of the general orbit enumeration: bounds its [|G|, step] arrays.
_ENUM_CHUNK = 1 << 22


def _general_orbits(po, so_s, pi, si_s, tau, so, si, k):
    """Orbits of a signed-permutation action on the block-local entries (a, b, x), listed in full.

    Pi_g moves (a, b, x) to (po[g, a], pi[g, b], tau[g, x]) with the sign so_s[g, a] si_s[g, b]
    (Pi_g(W) = rho_out(g) T_g(W) rho_in(g)^T, docs/design.md).  Each entry's |G| images are computed
    at once (vectorised, in chunks of entries); an entry represents its orbit when it is the smallest
    of its images.  Returns (members, signs), [orbits, |G|]: the images g . e of each representative e
    and the signs s(g, e)."""
    n = so * si * k
    n_g = po.shape[0]
    step = max(1, _ENUM_CHUNK // n_g)
    members, signs = [], []
    for e0 in range(0, n, step):
        e = np.arange(e0, min(n, e0 + step))
        a, rest = np.divmod(e, si * k)
        b, x = np.divmod(rest, k)
        img = (po[:, a] * si + pi[:, b]) * k + tau[:, x]          # [|G|, chunk]
        rep = img.min(axis=0) == e
        members.append(img[:, rep].T)
        signs.append((so_s[:, a] * si_s[:, b])[:, rep].T)
    return np.concatenate(members), np.concatenate(signs)


@functools.lru_cache(maxsize=256)
def _cached_table(group: FiniteGroup, in_rep: str, out_rep: str, shape: Tuple[int, ...]) -> OrbitTable:
    """The orbit table in time and memory proportional to its size (orbits x |G|), never |G| x block.

    Pi_g acts on a block-local entry (a, b, x) as (po[g, a], pi[g, b], tau[g, x]) times a sign; it is a
    representation because each factor is an action (checked: the kernel action against ``mul``,
    ``mul`` itself for regular fields, a registered rep when it was registered).  A regular output
    field makes the action free, and each orbit then holds exactly one entry whose regular coordinate
    is 0 (g . 0 = 0 only for g = e): those entries, all of them, are the orbits' smallest entries, so
    the representatives are known without listing the orbits.  Other signed-permutation fields list
    the orbits in full (``_general_orbits``); an entry of sign -1 is stored as ~offset (orbit_math.h).
    """
    out_side, in_side = side_of(group, out_rep, "out_rep"), side_of(group, in_rep, "in_rep")
    so, si = out_side.size, in_side.size
    kernel = shape[2:]
    k = int(np.prod(kernel)) if kernel else 1
    tau = _kernel_permutations(group, kernel)
    _check_kernel_action(group, tau, shape)
    po, po_s = _channel_action(out_side)
    pi, pi_s = _channel_action(in_side)
    if out_rep == "regular" or in_rep == "regular":
        _check_regular_action(group)
    signs = None
    if out_rep == "regular":
        # Representatives (0, b, x), in increasing order; members[(b, x), g] = (po[g, 0], pi[g, b], tau[g, x]).
        members = ((po[:, 0][None, None, :] * si + pi.T[:, None, :]) * k + tau.T[None, :, :]).reshape(si * k, -1)
        sizes = np.full(si * k, group.order)
        if in_side.rep.signed:
            signs = np.broadcast_to(pi_s.T[:, None, :], (si, k, group.order)).reshape(si * k, -1)
    elif in_rep == "regular" and out_rep == "trivial":
        # so == 1: representatives (0, 0, x); members[x, g] = (0, pi[g, 0], tau[g, x]).
        members = pi[:, 0][None, :] * k + tau.T
        sizes = np.full(k, group.order)
    elif in_rep == "trivial" and out_rep == "trivial":
        # Both trivial: the action is tau on the k kernel entries alone, a small [|G|, k] array.
        reps = np.nonzero(tau.min(axis=0) == np.arange(k))[0]
        members = tau[:, reps].T
        ordered = np.sort(members, axis=1)
        sizes = 1 + (np.diff(ordered, axis=1) != 0).sum(axis=1)
    else:
        members, signs = _general_orbits(po, po_s, pi, pi_s, tau, so, si, k)
        ordered = np.sort(members, axis=1)
        sizes = 1 + (np.diff(ordered, axis=1) != 0).sum(axis=1)
        if not (signs < 0).any():
            signs = None
    # Block-local (a, b, x) -> offset in the contiguous weight of shape (so*c_out, si*c_in, *kernel).
    a, rest = np.divmod(members, si * k)
    row_len = shape[1] * k
    offsets = a * row_len + rest
    if offsets.max() >= 2 ** 31 - 1:
        raise ValueError(f"weight: shape {shape} is too large: a field block spans more than 2^31 entries")
    # The bounds the kernels rely on, checked once here rather than on every call: every orbit
    # entry of the last block lies inside the weight.
    c_out, c_in = shape[0] // so, shape[1] // si
    last_base = (c_out - 1) * so * row_len + (c_in - 1) * si * k
    numel = int(np.prod(shape))
    if offsets.min() < 0 or last_base + offsets.max() >= numel:
        raise AssertionError(f"orbit table of {group.name} on shape {shape} reaches outside the weight")
    if signs is not None:
        offsets = np.where(signs < 0, ~offsets, offsets)
    return OrbitTable(
        group=group, shape=shape, field_out=so, field_in=si,
        c_out=c_out, c_in=c_in,
        offsets=torch.as_tensor(np.ascontiguousarray(offsets), dtype=torch.int64),
        inv_stab=torch.as_tensor(sizes / group.order, dtype=torch.float64),
        stride_out=so * row_len, stride_in=si * k,
        in_rep=in_rep, out_rep=out_rep, signed=signs is not None,
    )


def orbit_table(weight_or_shape, group="C4", in_rep="trivial", out_rep="trivial") -> OrbitTable:
    """Validate (weight, group, reps) (the per-argument errors of the public API) and return the cached orbit table."""
    if isinstance(weight_or_shape, torch.Tensor):
        check_weight(weight_or_shape)
        shape = tuple(weight_or_shape.shape)
    else:
        shape = tuple(int(s) for s in weight_or_shape)
    g = get_group(group)
    in_side, out_side = _check_rep(g, "in_rep", in_rep), _check_rep(g, "out_rep", out_rep)
    so, si = out_side.size, in_side.size
    if len(shape) not in (2, 3, 4, 5):
        raise ValueError(f"weight: expected 2, 3, 4 or 5 dims (Linear, Conv1d, Conv2d, Conv3d), got shape {shape}")
    for dim, side, arg, what in ((0, out_side, "out_rep", "out channels"), (1, in_side, "in_rep", "in channels")):
        size = side.size
        if side.count is not None:
            if shape[dim] != side.count * size:
                raise ValueError(
                    f"weight: dim {dim} ({what}) must be {side.count * size}, the size of {arg}={side.text} of "
                    f"{g.name}; got shape {shape}")
        elif shape[dim] % size or shape[dim] == 0:
            where = f"({size}*C_out, ...)" if dim == 0 else f"(..., {size}*C_in, ...)"
            raise ValueError(
                f"weight: dim {dim} ({what}) must be a positive multiple of the {side.text} field size {size} "
                f"of {g.name}, i.e. shape {where}; got shape {shape}")
    if any(s == 0 for s in shape[2:]):
        raise ValueError(f"weight: kernel dims must be positive, got shape {shape}")
    _check_action(g, shape)
    return _cached_table(g, in_side.text, out_side.text, shape)
