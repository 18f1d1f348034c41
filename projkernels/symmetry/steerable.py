"""Steerable symmetries: the projection onto escnn's equivariant kernel space, block by block.

``steerable(in_type, out_type, kernel_size)`` describes a layer between escnn field types (on a
continuous gspace such as ``rot2dOnR2(-1)``, ``flipRot2dOnR2(-1)``, ``rot3dOnR3()``, a discrete one
such as ``rot2dOnR2(4)``, or ``no_base_space(G)`` for ``nn.Linear`` weights).  Its projection P is
the orthogonal projection onto the span of the basis that escnn samples for that layer.

Why block by block.  escnn's kernel basis is a direct sum over pairs (output field, input field):
the sub-tensor ``W[out field i, in field j]`` (``d_out x d_in x k^d`` numbers, flattened to m) is
expanded from the basis of the pair of their representations, and every pair of fields with the
same pair of representations ("one block type") uses the same basis.  So P is a batch of small
dense projections: with Q_t (m x r, orthonormal columns spanning that basis, built once in float64
by an SVD with a rank tolerance), ``P(W_b) = Q_t Q_t^T W_b`` for every block b of type t.  The
dense alternative (one N x D orthonormal basis for the whole weight) costs N*D memory and time;
the block route costs sum_t m*r memory and one pass over W.

Exactness: the penalty is the squared norm of each block's residual ``W_b - Q_t Q_t^T W_b``, never
``||W_b||^2 - ||Q_t^T W_b||^2`` (which cancels catastrophically for a nearly equivariant weight).
Half-precision weights are read as such and accumulated in float32; results are float32 for half
and float32 weights and float64 for float64 weights, as for the finite groups.

Weight layout: ``nn.Linear`` ``[out_type.size, in_type.size]``, ``nn.Conv2d``
``[out_type.size, in_type.size, k, k]``, ``nn.Conv3d`` ``[out_type.size, in_type.size, k, k, k]``:
the layout of escnn's expanded filter (fields occupy consecutive channels, in field-type order).

This module describes the symmetry and its device layouts; the backends' steerable slots compute
with them: "cpp" and "cuda" (the compiled ops ``projkernels_C::steerable_*``, projkernels/backends/native.py:
one pass over tiles of blocks fixed by the layout, autograd in C++ with double backward; they take
``Layout.native``, resident on the device), "reference" (projkernels/backends/reference/steerable.py:
block types of equal size batched, one gather, two batched matmuls) and "triton" (one program per tile of
blocks of one type, Q_t loaded once per program; projkernels/backends/triton/steerable.py).  "auto"
picks Triton on CUDA tensors, else the reference route (backend="cuda" is opt-in until its kernels' GPU
tests have run), and cpp on CPU tensors when the extension is built, else the reference route.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import functools

import numpy as np
import torch

from ..orbits import acc_dtype  # the one accumulation-dtype rule

__all__ = ["steerable", "SteerableSymmetry", "BlockType", "Layout", "check_module", "no_spectrum"]

_RANK_RTOL = 1e-6  # _orthonormal's tolerance, for well-conditioned inputs (the bias' trivial parts)
# The rank of a layer's basis, sampled in float64 (_block_types): a singular value below _NOISE_RTOL of
# the layer's largest is noise, one above _SIGNAL_RTOL is basis, and one in between is an ambiguous
# spectrum that raises.  Measured over 2-D and 3-D gspaces, kernel sizes 3-7 and frequencies_cutoff up
# to 14: noise <= 3.1e-15 from the float64 sampling, and <= 1.3e-9 where escnn's coupling coefficients,
# which it stores in float32, should cancel on the grid (octaOnR3, kernel 3, cutoff 6); basis >= 8.5e-4
# (C4, kernel 7).  escnn's own float32 sampling puts noise at 1e-6 to 4e-6, which a cut at 1e-6 kept.
_NOISE_RTOL = 1e-7
_SIGNAL_RTOL = 1e-5


def _escnn():
    from ..install_hints import escnn_hint
    try:
        import escnn.nn  # noqa: F401
        import escnn.gspaces  # noqa: F401
    except ImportError as e:
        raise ImportError(f"projkernels.steerable needs escnn, an optional dependency: {escnn_hint()}") from e
    import escnn
    return escnn


@dataclass(frozen=True, eq=False)
class BlockType:
    """One pair (output representation, input representation) and the blocks of the weight that it
    covers: output fields ``out_fields`` x input fields ``in_fields`` (channel offsets), each block
    ``d_out x d_in x S`` flattened to ``m`` numbers in (out channel, in channel, kernel position)
    order.  ``q``: [m, r] float64 with orthonormal columns (r = 0 when escnn's basis is empty)."""
    out_name: str
    in_name: str
    d_out: int
    d_in: int
    out_fields: Tuple[int, ...]
    in_fields: Tuple[int, ...]
    q: torch.Tensor

    @property
    def m(self) -> int:
        return self.q.shape[0]

    @property
    def rank(self) -> int:
        return self.q.shape[1]

    @property
    def n_blocks(self) -> int:
        return len(self.out_fields) * len(self.in_fields)


class SteerableSymmetry:
    """The symmetry of a layer between escnn field types; accepted wherever a group is.

    Attributes: ``in_type``, ``out_type``, ``kernel_size`` (None for Linear), ``weight_shape``,
    ``types`` (the ``BlockType`` list), ``dim`` (the dimension of the equivariant space, sum over
    types of n_blocks * r) and ``numel`` (the weight's size).  Built by ``steerable()``, which
    caches it: the same arguments give the same object (and so hit the configuration caches), or
    read off an escnn layer by ``projkernels.escnn_interop.steerable_from_layer`` (``basis_options``
    is then None).
    """

    def __init__(self, in_type, out_type, kernel_size, basis_options: Optional[dict], layer=None):
        # ``layer``: an escnn Linear / R2Conv / R3Conv between these types whose own basis expansion is
        # read instead of building one from ``basis_options`` (then None): escnn folds a layer's basis
        # options into a filter closure that it does not keep (projkernels/escnn_interop.py).
        _escnn()
        import escnn.nn as enn
        if in_type.gspace != out_type.gspace:
            raise ValueError(f"out_type: its gspace {out_type.gspace} differs from in_type's {in_type.gspace}")
        gs = in_type.gspace
        d = gs.dimensionality
        if d == 0:
            if kernel_size is not None:
                raise ValueError(f"kernel_size: must be None for field types on no_base_space (an nn.Linear "
                                 f"weight), got {kernel_size!r}")
            module = layer if layer is not None else enn.Linear(in_type, out_type, bias=False, initialize=False,
                                                                  **basis_options)
            spatial: Tuple[int, ...] = ()
        elif d in (2, 3):
            if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1:
                raise ValueError(f"kernel_size: a positive int is required for a {d}-D gspace ({gs}), "
                                 f"got {kernel_size!r}")
            conv = enn.R2Conv if d == 2 else enn.R3Conv
            if layer is not None:
                module = layer
            else:
                module = conv(in_type, out_type, kernel_size, bias=False, initialize=False, **basis_options)
            spatial = (kernel_size,) * d
        else:
            raise ValueError(f"in_type: gspaces of dimension {d} are not supported (0, 2 or 3)")
        self.in_type, self.out_type, self.kernel_size = in_type, out_type, kernel_size
        self.basis_options = None if basis_options is None else dict(basis_options)
        self.spatial_dims = d
        self.weight_shape = (out_type.size, in_type.size) + spatial
        self.numel = out_type.size * in_type.size * (kernel_size ** d if d else 1)
        label = (f"steerable({gs.fibergroup}: {_type_label(in_type)} -> {_type_label(out_type)}"
                 + ("" if kernel_size is None else f", kernel_size={kernel_size}")
                 + ("" if basis_options is None else "".join(f", {k}={v!r}" for k, v in basis_options.items()))
                 + (f", from a {type(layer).__name__} layer" if layer is not None else "") + ")")
        self.types = _block_types(module, in_type, out_type, label)
        self.dim = sum(t.n_blocks * t.rank for t in self.types)
        self._device_cache: Dict[tuple, object] = {}
        for acc in (torch.float32, torch.float64):
            self.layout("cpu", acc)

    def __repr__(self) -> str:
        ks = "" if self.kernel_size is None else f", kernel_size={self.kernel_size}"
        return (f"steerable({self.in_type.fibergroup}: {_type_label(self.in_type)} -> "
                f"{_type_label(self.out_type)}{ks}; {self.dim} of {self.numel} dims)")

    __str__ = __repr__

    # Immutable: copies of a model share it (and so the configuration caches and device layouts).
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise TypeError("a steerable symmetry cannot be pickled (escnn's field types do not pickle); save the "
                        "model's state_dict, which never holds symmetries, and attach them again after loading")

    @property
    def name(self) -> str:
        return repr(self)

    def check_weight(self, weight, argument: str = "weight") -> None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{argument}: expected a torch.Tensor, got {type(weight).__name__}")
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"{argument}: shape {tuple(weight.shape)} does not match the steerable symmetry's "
                             f"weight shape {self.weight_shape} (out_type.size, in_type.size, *kernel)")
        if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{argument}: dtype {weight.dtype} is not supported (float16, bfloat16, float32, float64)")
        if weight.layout != torch.strided:
            raise TypeError(f"{argument}: expected a dense (strided) tensor, got layout {weight.layout}; "
                            "convert it first (weight.to_dense())")

    def layout(self, device, acc: torch.dtype) -> "Layout":
        """The device-resident form (Q_t in ``acc``, index tensors), built once per (device, dtype)."""
        key = (torch.device(device), acc)
        lay = self._device_cache.get(key)
        if lay is None:
            # No lock: two threads racing here build equal layouts, and a lock would stop torch.compile.
            # Under torch.compile the build runs eagerly (a graph break) so that the cached tensors are
            # real; CPU layouts are built with the symmetry and a device's on the API's first call.
            build = torch.compiler.disable(_layout) if torch.compiler.is_compiling() else _layout
            lay = self._device_cache[key] = build(self, key[0], acc)
        return lay

    def dense_basis(self) -> torch.Tensor:
        """[numel, dim] float64 orthonormal basis of the whole equivariant space (the naive route's Q;
        for tests and benchmarks: it costs numel * dim memory)."""
        shape = self.weight_shape
        s = self.numel // (shape[0] * shape[1])
        cols = []
        for t in self.types:
            if t.rank == 0:
                continue
            for o in t.out_fields:
                for i in t.in_fields:
                    block = torch.zeros(shape[0], shape[1], s, t.rank, dtype=torch.float64)
                    block[o:o + t.d_out, i:i + t.d_in] = t.q.reshape(t.d_out, t.d_in, s, t.rank)
                    cols.append(block.reshape(-1, t.rank))
        return torch.cat(cols, 1) if cols else torch.zeros(self.numel, 0, dtype=torch.float64)


def _type_label(ft) -> str:
    names = [r.name for r in ft.representations]
    out, i = [], 0
    while i < len(names):
        j = i
        while j < len(names) and names[j] == names[i]:
            j += 1
        out.append(names[i] if j - i == 1 else f"{j - i}x{names[i]}")
        i = j
    return "[" + ", ".join(out) + "]"


def _fields(ft) -> Dict[str, List[int]]:
    """Channel offsets of the fields of each representation, in first-appearance order."""
    by_name: Dict[str, List[int]] = {}
    off = 0
    for r in ft.representations:
        by_name.setdefault(r.name, []).append(off)
        off += r.size
    return by_name


def _block_types(module, in_type, out_type, label: str) -> List[BlockType]:
    """Q_t of every block type, from escnn's analytic basis sampled again in float64.

    Why not escnn's ``sampled_basis``: escnn samples in float32, and with a large ``frequencies_cutoff``
    its elements alias on the grid into combinations of the others (or vanish there), so their float32
    residue (1e-6 to 4e-6 of the largest singular value) is kept as basis by any cut near 1e-6, and P(W)
    then leaves the grid-equivariant space (a 5x5 C4-invariant kernel at cutoff 10 got 9 dimensions of
    the 7 that exist).  In float64 that residue is ~1e-15 (1e-9 where escnn's float32-stored coupling
    coefficients should cancel), and the spectrum has a gap of at least five orders.

    The rank is decided once for the layer: every block type's singular values (of the unnormalised
    samples, whose elements are O(1): a radial profile <= 1 times harmonics and coupling coefficients)
    are compared with the largest over all types.  That is what one SVD of the whole dense basis would
    decide, since the dense basis is block diagonal up to a permutation and its singular values are
    the union of the types'; a per-type reference (each type's own largest) could split them
    differently near a threshold, and the required gap (nothing between _NOISE_RTOL and _SIGNAL_RTOL)
    keeps the decision away from any threshold.
    """
    be = module.basisexpansion
    sizes_in = {r.name: r.size for r in in_type.representations}
    sizes_out = {r.name: r.size for r in out_type.representations}
    in_fields, out_fields = _fields(in_type), _fields(out_type)
    pairs = set(be._representations_pairs)  # (in name, out name) pairs with a non-empty basis
    s = max(1, int(getattr(be, "S", 1)))
    svds, resampled = {}, True
    for i_name in in_fields:
        for o_name in out_fields:
            if (i_name, o_name) in pairs:
                block = getattr(be, f"block_expansion_{be._escape_pair((i_name, o_name))}")
                b = _sample_float64(be, block, label, (i_name, o_name))
                if b is None:  # not re-sampleable: escnn's own float32 samples (docs/steerable.md, Sampling)
                    resampled = False
                    b = block.sampled_basis.detach().to("cpu", torch.float64).reshape(block.sampled_basis.shape[0], -1)
                # [n_basis, d_out * d_in * S]: the layout of the block of the expanded filter
                svds[(i_name, o_name)] = torch.linalg.svd(b.T, full_matrices=False)[:2]
    top = max((float(sv[0]) for _, sv in svds.values() if sv.numel()), default=0.0)
    types = []
    for o_name, o_offs in out_fields.items():
        for i_name, i_offs in in_fields.items():
            d_o, d_i = sizes_out[o_name], sizes_in[i_name]
            m = d_o * d_i * s
            if (i_name, o_name) in svds:
                u, sv = svds[(i_name, o_name)]
                q = u[:, :_basis_rank(sv, top, resampled, label, (i_name, o_name))].contiguous()
            else:
                q = torch.zeros(m, 0, dtype=torch.float64)  # no equivariant map between these fields
            types.append(BlockType(o_name, i_name, d_o, d_i, tuple(o_offs), tuple(i_offs), q))
    return types


def _to_float64(module, seen: set, saved: list) -> None:
    """Switch the floating tensors of an escnn kernel basis (and its sub-bases) to float64 in place,
    recording the originals in ``saved`` for ``_restore``.  Not ``module.double()``: torch's walk over
    children compares them with ``==``, and escnn's bases compare their buffers, which fails on a
    mixed-dtype tree halfway through.  Not a deep copy either: escnn's groups do not all survive one."""
    if id(module) in seen:
        return
    seen.add(id(module))
    for tensors in (module._buffers, module._parameters):
        for name, t in tensors.items():
            if t is not None and t.is_floating_point() and t.dtype != torch.float64:
                saved.append((tensors, name, t))
                tensors[name] = t.detach().to(torch.float64)
    for child in module._modules.values():
        if child is not None:
            _to_float64(child, seen, saved)


def _sample_float64(be, block, label: str, pair) -> Optional[torch.Tensor]:
    """[n_basis, d_out * d_in * S] float64 samples of the analytic basis ``block.basis`` at escnn's
    points ``be.points``, for the elements escnn kept (``block._mask``), unnormalised; None where the
    block holds no analytic basis to sample.  The escnn objects are left as they were (the basis is
    shared between layers: escnn caches it)."""
    basis, mask, points = getattr(block, "basis", None), getattr(block, "_mask", None), getattr(be, "points", None)
    if basis is None or mask is None or points is None or not hasattr(basis, "sample"):
        return None
    stored = block.sampled_basis.detach().to("cpu", torch.float64)
    saved: list = []
    try:
        _to_float64(basis, set(), saved)
        raw = basis.sample(torch.as_tensor(np.asarray(points), dtype=torch.float64))   # [S, n, d_out, d_in]
    except (RuntimeError, TypeError):
        return None  # a basis whose sampling is float32-only
    finally:
        for tensors, name, t in saved:
            tensors[name] = t
    mask = torch.as_tensor(mask, dtype=torch.bool)
    raw = raw.detach().permute(1, 2, 3, 0)
    if raw.shape[0] != mask.numel() or raw[mask].shape != stored.shape:
        return None
    b = raw[mask].reshape(stored.shape[0], -1)
    # The float64 sample must be escnn's basis: element by element (escnn normalises each, so compare
    # directions) wherever an element is not mostly float32 residue in escnn's copy.
    flat = stored.reshape(stored.shape[0], -1)
    nb, ns = b.norm(dim=1), flat.norm(dim=1)
    big = nb >= 1e-3 * float(nb.max())
    dev = (b[big] / nb[big, None] - flat[big] / ns[big, None]).norm(dim=1)
    if dev.numel() and float(dev.max()) > 1e-3:
        raise ValueError(f"{label}: the basis of the pair (in {pair[0]!r}, out {pair[1]!r}) sampled again in float64 "
                         f"differs from escnn's sampled basis (direction error {float(dev.max()):.1e}); was the "
                         "layer's basis expansion changed after it was built?")
    return b


def _basis_rank(sv: torch.Tensor, top: float, resampled: bool, label: str, pair) -> int:
    """How many of one block type's singular values ``sv`` (descending) are basis, against ``top``, the
    largest over the layer (see _block_types)."""
    if top <= 0:
        return 0
    rel = sv / top
    if not resampled:
        # escnn's float32 samples: their noise reaches 4e-6 of the largest, and no gap can be required
        return int((rel > 1e-5).sum())
    unclear = rel[(rel >= _NOISE_RTOL) & (rel <= _SIGNAL_RTOL)]
    if unclear.numel():
        raise ValueError(
            f"{label}: the basis of the pair (in {pair[0]!r}, out {pair[1]!r}) has no clear rank: singular values "
            f"{', '.join(f'{float(v):.1e}' for v in unclear[:4])} of the largest lie between noise (below "
            f"{_NOISE_RTOL:.0e}) and clear basis directions (above {_SIGNAL_RTOL:.0e}); change frequencies_cutoff, "
            "rings or sigma so that escnn's basis elements are not nearly dependent on the grid")
    return int((rel > _SIGNAL_RTOL).sum())


def _orthonormal(b: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the columns of ``b`` (float64 SVD, rank tolerance _RANK_RTOL)."""
    if b.shape[1] == 0:
        return b
    u, sv, _ = torch.linalg.svd(b, full_matrices=False)
    rank = int((sv > _RANK_RTOL * sv[0]).sum()) if sv.numel() and sv[0] > 0 else 0
    return u[:, :rank].contiguous()


class TypeLayout(NamedTuple):
    """One block type on the device (the Triton route's view)."""
    q: torch.Tensor             # [m, r] in the accumulation dtype
    n_blocks: int
    base: torch.Tensor          # [n_blocks] int64 offsets of each block's first element in W (row-major)
    elem: torch.Tensor          # [m] int64 offsets of a block's elements relative to its first


class Member(NamedTuple):
    """Where one block type's blocks sit in W, for the reference route: when its fields' channel
    offsets are evenly spaced (the usual case: one field type, or a repeated pattern of types), a
    view ``[n_out, n_in, d_out, d_in, S]`` of W made of two unfolds (one strided copy is several
    times faster than an index gather on a CPU); otherwise the group's index serves it."""
    n_blocks: int
    view: Tuple[int, ...]               # (n_out, n_in, d_out, d_in, S)
    strided: Optional[Tuple[int, int, int, int]]  # (first out channel, out spacing, first in channel, in spacing)


class GroupLayout(NamedTuple):
    """Block types of equal block size m, batched for the reference route: type j's blocks are rows
    ``[j, :n_blocks_j]`` of a ``[T, n_blocks_max, m]`` tile (padding rows are zeros) and its Q_t is
    ``q[j]`` (padded with zero columns).  Padding contributes exact zeros."""
    members: Tuple[Member, ...]
    n_blocks: int                       # n_blocks_max
    m: int
    padded: bool
    q: torch.Tensor                     # [T, m, r_max] in the accumulation dtype
    index: Optional[torch.Tensor]       # [T * n_blocks_max * m] into W flattened plus one zero (padding
                                        # points there): one gather for a small group of many types


class NativeLayout(NamedTuple):
    """The arguments of the compiled ops (csrc/include/steerable_checks.h describes them): ``table`` =
    [q, fields, desc, zero, half, qt] on the device, ``geometry`` = [c_out, c_in, S, descriptor rows]."""
    table: List[torch.Tensor]
    geometry: List[int]


class Layout(NamedTuple):
    shape3: Tuple[int, int, int]        # the weight as [C_out, C_in, S]
    numel: int
    types: Tuple[TypeLayout, ...]
    groups: Tuple[GroupLayout, ...]
    flat: bool                          # some group gathers through an index
    native: NativeLayout                # the compiled ops' view


_SMALL_GROUP = 1 << 16  # elements: below this a group is gathered with one index op
# Elements of work per tile of the compiled ops (one CUDA block, one CPU task): a function of the
# block size and the device type alone, so the partition of every sum is the same on any machine of
# that type (and so are the bits, up to the CPU kernels' instruction set: csrc/cpu/steerable_kernels.cpp).
# On a GPU it also bounds a tile's coefficients (blocks_per_tile * r <= blocks_per_tile * m) to this
# many numbers when m is below it, well within a CUDA block's shared memory.  A CPU task computes its
# tile as two small matrix products in which every row of Q_t read from cache serves all the tile's
# blocks (up to 12 at a time in registers): larger tiles reuse it more (m = 400: 20 blocks instead of
# 5, about twice as fast) and still leave one task per 8192 weights to split among the threads.
_TILE_ELEMS = 2048
_CPU_TILE_ELEMS = 8192


def _blocks_per_tile(m: int, device: torch.device) -> int:
    return max(1, (_CPU_TILE_ELEMS if device.type == "cpu" else _TILE_ELEMS) // m)


def _spacing(offsets: Tuple[int, ...]) -> Optional[int]:
    if len(offsets) == 1:
        return 0
    d = offsets[1] - offsets[0]
    ok = d > 0 and all(b - a == d for a, b in zip(offsets, offsets[1:]))
    return d if ok else None


def _layout(sym: SteerableSymmetry, device: torch.device, acc: torch.dtype) -> Layout:
    c_out, c_in = sym.weight_shape[:2]
    s = sym.numel // (c_out * c_in)
    types, by_m = [], {}
    for t in sym.types:
        base = torch.tensor([(o * c_in + i) * s for o in t.out_fields for i in t.in_fields], dtype=torch.long)
        p, q, k = torch.meshgrid(torch.arange(t.d_out), torch.arange(t.d_in), torch.arange(s), indexing="ij")
        elem = ((p * c_in + q) * s + k).reshape(-1)
        types.append(TypeLayout(t.q.to(device=device, dtype=acc), t.n_blocks, base.to(device), elem.to(device)))
        so, si = _spacing(t.out_fields), _spacing(t.in_fields)
        view = (len(t.out_fields), len(t.in_fields), t.d_out, t.d_in, s)
        if so is not None and si is not None:
            member = Member(t.n_blocks, view, (t.out_fields[0], so, t.in_fields[0], si))
        else:
            member = Member(t.n_blocks, view, None)  # served by the group's index
        by_m.setdefault(t.m, []).append((t, member))
    groups = []
    for m, members in by_m.items():
        nb = max(t.n_blocks for t, _ in members)
        r = max(t.rank for t, _ in members)
        qs = torch.zeros(len(members), m, r, dtype=torch.float64)
        for j, (t, _) in enumerate(members):
            qs[j, :, :t.rank] = t.q
        padded = any(t.n_blocks != nb for t, _ in members)
        index = None
        if len(members) * nb * m <= _SMALL_GROUP or any(mb.strided is None for _, mb in members):
            # one index gather beats a strided copy per type when the group is small (host cost) or
            # when some fields are unevenly spaced anyway
            index = torch.full((len(members), nb, m), sym.numel, dtype=torch.long)
            for j, (t, _) in enumerate(members):
                tb = torch.tensor([(o * c_in + i) * s for o in t.out_fields for i in t.in_fields], dtype=torch.long)
                p, q, k = torch.meshgrid(torch.arange(t.d_out), torch.arange(t.d_in), torch.arange(s), indexing="ij")
                index[j, :t.n_blocks] = tb[:, None] + ((p * c_in + q) * s + k).reshape(-1)[None, :]
            index = index.reshape(-1).to(device)
        groups.append(GroupLayout(tuple(mb for _, mb in members), nb, m, padded, qs.to(device=device, dtype=acc),
                                  index))
    return Layout((c_out, c_in, s), sym.numel, tuple(types), tuple(groups),
                  any(g.index is not None for g in groups), _native_layout(sym, device, acc))


def _native_layout(sym: SteerableSymmetry, device: torch.device, acc: torch.dtype) -> NativeLayout:
    """Every Q_t concatenated (and every Q_t^T, for the CPU kernels' P X and the CUDA kernels), the
    fields' channel offsets and one descriptor row per type
    (d_out, d_in, r, n_out, n_in, q offset, fields offset, blocks per tile, first tile), as
    csrc/include/steerable_math.h reads them."""
    c_out, c_in = sym.weight_shape[:2]
    s = sym.numel // (c_out * c_in)
    qs, qts, fields, rows = [], [], [], []
    q_off = f_off = tile = 0
    for t in sym.types:
        per_tile = _blocks_per_tile(t.m, device)
        rows.append([t.d_out, t.d_in, t.rank, len(t.out_fields), len(t.in_fields), q_off, f_off, per_tile, tile])
        qs.append(t.q.reshape(-1))
        qts.append(t.q.T.reshape(-1))
        fields.extend(t.out_fields + t.in_fields)
        q_off += t.q.numel()
        f_off += len(t.out_fields) + len(t.in_fields)
        tile += -(-t.n_blocks // per_tile)
    table = [torch.cat(qs).to(device=device, dtype=acc),
             torch.tensor(fields, dtype=torch.long, device=device),
             torch.tensor(rows, dtype=torch.long, device=device),
             torch.zeros((), dtype=acc, device=device),
             torch.full((), 0.5, dtype=acc, device=device),
             torch.cat(qts).to(device=device, dtype=acc)]
    return NativeLayout(table, [c_out, c_in, s] + [v for row in rows for v in row])


_SYMMETRIES: Dict[tuple, SteerableSymmetry] = {}


def steerable(in_type, out_type, kernel_size: Optional[int] = None, **basis_options) -> SteerableSymmetry:
    """The symmetry of a layer mapping escnn field type ``in_type`` to ``out_type``.

    ``kernel_size``: None for an ``nn.Linear`` weight (field types on ``no_base_space(G)``), the
    side of the (square / cubic) kernel for ``nn.Conv2d`` / ``nn.Conv3d`` weights (field types on a
    2-D / 3-D gspace).  ``basis_options`` go to escnn's ``R2Conv`` / ``R3Conv`` / ``Linear``
    (``frequencies_cutoff``, ``rings``, ``sigma``, ``maximum_offset``, ``basis_filter``, ...) and
    select the sampled basis.  The result is cached: equal arguments give the same object.
    """
    _escnn()
    from escnn.nn import FieldType
    for arg, ft in (("in_type", in_type), ("out_type", out_type)):
        if not isinstance(ft, FieldType):
            raise TypeError(f"{arg}: expected an escnn.nn.FieldType, got {type(ft).__name__}")
    try:
        key = (in_type, out_type, kernel_size, tuple(sorted(basis_options.items())))
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _SYMMETRIES:
        return _SYMMETRIES[key]
    sym = SteerableSymmetry(in_type, out_type, kernel_size, basis_options)
    if key is not None:
        _SYMMETRIES[key] = sym
    return sym



def no_spectrum(weight, *_args):
    raise NotImplementedError("spectrum: isotypic energies are defined for the finite groups only; for a "
                              "steerable symmetry use penalty_and_energy")


# --- whole models ---------------------------------------------------------------------------------

def module_kind(sym: SteerableSymmetry) -> str:
    return {0: "nn.Linear", 2: "nn.Conv2d", 3: "nn.Conv3d"}[sym.spatial_dims]


def check_module(module, sym: SteerableSymmetry) -> None:
    """``attach_symmetry``'s check of a layer (and backend) against a steerable symmetry."""
    from torch import nn
    layer = {0: nn.Linear, 2: nn.Conv2d, 3: nn.Conv3d}[sym.spatial_dims]
    if not isinstance(module, layer):
        raise TypeError(f"module: this steerable symmetry describes an {module_kind(sym)} weight, got "
                        f"{type(module).__name__}")
    if getattr(module, "groups", 1) != 1:
        raise ValueError(f"module: grouped convolutions (groups={module.groups}) are not supported; use groups=1")
    sym.check_weight(module.weight, "module.weight")
