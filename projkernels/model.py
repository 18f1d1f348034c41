"""Model-level API: attach a group symmetry to layers, penalise, project and report.

A symmetry ``(group, in_rep, out_rep)`` is stored on the layer itself (attribute
``_projkernels_symmetry``), so it follows the module through ``copy.deepcopy``, ``model.to(...)``
and wrapping in bigger models, and it never enters the ``state_dict``.  Supported layers are
``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (and subclasses) with ``groups=1``.

Biases.  For a layer whose output fields are ``regular``, the bias is equivariant exactly when
it is constant on each field; for ``trivial`` output fields every bias is equivariant.  So the
bias's projection is the mean over each regular field, and its non-equivariance is the squared
deviation from that mean.  ``model_penalty`` adds that deviation to the ``lambda_perp`` term and
``project_`` replaces the bias with its field means, both by default (``bias=False`` turns it off).
``lambda_G`` acts on weights only: like weight decay, it is rarely wanted on biases.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .api import penalty_and_energy, project, spectrum
from .multi import multi_penalty
from .groups import get_group, group_name_for_ops
from .orbits import field_size, orbit_table

__all__ = ["Symmetry", "attach_symmetry", "detach_symmetry", "get_symmetry", "attach_symmetries",
           "attach_regular_gcnn", "attached_layers", "model_penalty", "project_", "equivariance_report",
           "format_report", "SUPPORTED_LAYERS"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_ATTR = "_projkernels_symmetry"


@dataclass(frozen=True)
class Symmetry:
    """How ``group`` acts on a layer: channel representations on the input and output side."""
    group: str
    in_rep: str = "trivial"
    out_rep: str = "trivial"
    backend: str = "auto"

    def __str__(self) -> str:
        return f"{self.group} {self.in_rep}->{self.out_rep}"


SymmetryLike = Union[Symmetry, str, Tuple, Dict, None]


def _as_symmetry(spec: SymmetryLike) -> Optional[Symmetry]:
    if spec is None or isinstance(spec, Symmetry):
        return spec
    if isinstance(spec, str):
        return Symmetry(spec)
    if isinstance(spec, tuple):
        return Symmetry(*spec)
    if isinstance(spec, dict):
        return Symmetry(**spec)
    raise TypeError("rule: expected the rule to return None, a Symmetry, a group name, a tuple "
                    f"(group, in_rep, out_rep) or a dict of those keys; got {type(spec).__name__}")


def _check_module(module, name: str = "module") -> None:
    if not isinstance(module, SUPPORTED_LAYERS):
        raise TypeError(f"{name}: expected nn.Linear, nn.Conv1d or nn.Conv2d, got {type(module).__name__}")
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
        # A grouped conv's weight is (out, in/groups, ...): its dim 1 is not the layer's input space.
        raise ValueError(f"{name}: grouped convolutions (groups={module.groups}) are not supported; "
                         "use groups=1")


def _layer_label(module, name: Optional[str]) -> str:
    """How errors name a layer: its module path when known, always its type and weight shape."""
    weight = getattr(module, "weight", None)
    shape = f" {'x'.join(map(str, weight.shape))}" if isinstance(weight, torch.Tensor) else ""
    what = f"{type(module).__name__}{shape}"
    if name is None:
        return f"layer ({what})"
    return f"layer {name or '(model)'!r} ({what})"


def _name_layer(err: Exception, module, name: Optional[str]) -> Exception:
    # Same exception type, message prefixed with the layer, so callers' except clauses still match.
    return type(err)(f"{_layer_label(module, name)}: {err}")


def attach_symmetry(module: nn.Module, group="C4", in_rep: str = "trivial", out_rep: str = "trivial", *,
                    backend: str = "auto", name: Optional[str] = None) -> Symmetry:
    """Declare that ``group`` acts on ``module``'s input and output channels by ``in_rep`` / ``out_rep``.

    Validates now against the weight's shape (field sizes, group against kernel; see docs/design.md,
    Conventions), so a wrong declaration fails here and not in the middle of training.  Errors are
    ``TypeError`` / ``ValueError`` whose message starts with the layer: ``name`` (its module path,
    which ``attach_symmetries`` and ``attach_regular_gcnn`` pass), its type and weight shape.
    Returns the stored Symmetry.
    """
    try:
        _check_module(module)
        group_name = group_name_for_ops(group)
        orbit_table(module.weight, group_name, in_rep, out_rep)
        sym = Symmetry(get_group(group_name).name, in_rep, out_rep, backend)
    except (TypeError, ValueError) as err:
        raise _name_layer(err, module, name) from None
    setattr(module, _ATTR, sym)
    return sym


def detach_symmetry(module: nn.Module) -> None:
    if hasattr(module, _ATTR):
        delattr(module, _ATTR)


def get_symmetry(module: nn.Module) -> Optional[Symmetry]:
    return getattr(module, _ATTR, None)


def attach_symmetries(model: nn.Module, rule: Callable[[str, nn.Module], SymmetryLike]) -> Dict[str, Symmetry]:
    """Call ``rule(name, layer)`` for every supported layer of ``model`` (module order) and attach
    what it returns (None skips the layer).  Returns ``{name: Symmetry}`` of the attached layers.
    An invalid declaration raises at once, naming the layer by its module path."""
    attached = {}
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED_LAYERS):
            continue
        spec = rule(name, module)
        try:
            sym = _as_symmetry(spec)
        except (TypeError, ValueError) as err:
            raise _name_layer(err, module, name) from None
        if sym is None:
            continue
        attached[name] = attach_symmetry(module, sym.group, sym.in_rep, sym.out_rep, backend=sym.backend,
                                         name=name)
    return attached


def attach_regular_gcnn(model: nn.Module, group="C4", *, first_in: str = "trivial", last_out: str = "regular",
                        layer_types: Sequence[type] = (nn.Conv1d, nn.Conv2d)) -> Dict[str, Symmetry]:
    """The common G-CNN layout: every conv (in module order) is regular -> regular, except that the
    first takes ``first_in`` fields (the image's trivial channels) and the last gives ``last_out``
    (``"trivial"`` for an invariant / scalar-field head).  Errors name the offending layer."""
    group = get_group(group_name_for_ops(group)).name  # a bad group fails once, before any layer
    layers = [name for name, m in model.named_modules() if isinstance(m, tuple(layer_types))]
    if not layers:
        raise ValueError("model: no layer of the types "
                         f"{[t.__name__ for t in layer_types]} found to attach a symmetry to")
    first, last = layers[0], layers[-1]

    def rule(name, module):
        if name not in layers:
            return None
        return Symmetry(group, first_in if name == first else "regular", last_out if name == last else "regular")
    return attach_symmetries(model, rule)


def attached_layers(model: nn.Module) -> List[Tuple[str, nn.Module, Symmetry]]:
    """``(name, layer, Symmetry)`` for every layer of ``model`` with a symmetry, in module order."""
    return [(name, m, getattr(m, _ATTR)) for name, m in model.named_modules() if hasattr(m, _ATTR)]


# --- penalties -------------------------------------------------------------------------------

def _regular_fields(vector: Optional[torch.Tensor], sym: Symmetry) -> Optional[torch.Tensor]:
    """A bias-shaped ``vector`` as a [fields, |G|] view when the output fields are regular; None otherwise."""
    if vector is None or sym.out_rep != "regular":
        return None
    return vector.view(-1, field_size("regular", get_group(sym.group)))


def _bias_fields(module: nn.Module, sym: Symmetry) -> Optional[torch.Tensor]:
    """The bias as [fields, |G|] when its output fields are regular; None otherwise."""
    return _regular_fields(module.bias, sym)


def _field_means(fields: torch.Tensor) -> torch.Tensor:
    """The projection of a [fields, |G|] bias: each regular field replaced by its mean (a bias is
    equivariant exactly when it is constant on every regular field)."""
    return fields.mean(dim=1, keepdim=True).expand_as(fields)


@torch.no_grad()
def project_bias_(vector: Optional[torch.Tensor], sym: Symmetry) -> None:
    """In place: replace a layer's bias (or the bias's gradient) by its projection under ``sym``, the
    mean over each regular output field.  Trivial output fields: nothing to do (every bias is
    equivariant)."""
    fields = _regular_fields(vector, sym)
    if fields is not None:
        fields.copy_(_field_means(fields))


def _weight_terms(layers) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of ||W - P(W)||^2, sum of ||P(W)||^2) over ``layers``: one whole-model call per backend
    named in the symmetries (normally just one), so the cost does not grow in calls with depth."""
    by_backend: Dict[str, list] = {}
    for _, module, sym in layers:
        by_backend.setdefault(sym.backend, []).append((module.weight, sym.group, sym.in_rep, sym.out_rep))
    pen = eq = None
    for backend, items in by_backend.items():
        p, e, _, _ = multi_penalty(items, backend=backend)
        pen = p if pen is None else pen + p.to(pen.device)
        eq = e if eq is None else eq + e.to(eq.device)
    return pen, eq


def _bias_term(layers) -> Optional[torch.Tensor]:
    """||b - P(b)||^2 summed over the regular-field biases, one concatenation per field size."""
    by_size: Dict[int, list] = {}
    for _, module, sym in layers:
        b = _bias_fields(module, sym)
        if b is not None:
            by_size.setdefault(b.shape[1], []).append(b)
    total = None
    for fields in by_size.values():
        b = torch.cat(fields) if len(fields) > 1 else fields[0]
        t = (b - b.mean(dim=1, keepdim=True)).square().sum()
        total = t if total is None else total + t.to(total.device)
    return total


def model_penalty(model: nn.Module, lambda_perp: float = 1.0, lambda_G: float = 0.0, *,
                  bias: bool = True) -> torch.Tensor:
    """``sum over attached layers of lambda_perp ||W - P(W)||^2 + lambda_G ||P(W)||^2`` (differentiable).

    With ``bias=True`` the non-equivariant part of regular-field biases joins the ``lambda_perp``
    term (see the module docstring).  All weights go through ``multi_penalty`` in one call (one
    pass per direction).  Raises ValueError if no layer of ``model`` has a symmetry attached
    (almost always a forgotten attach).
    """
    layers = attached_layers(model)
    if not layers:
        raise ValueError("model: no layer has a symmetry attached; call attach_symmetry / attach_symmetries "
                         "/ attach_regular_gcnn first")
    pen, eq = _weight_terms(layers)
    total = lambda_perp * pen
    if lambda_G:
        total = total + lambda_G * eq
    if bias:
        b = _bias_term(layers)
        if b is not None:
            total = total + lambda_perp * b.to(device=total.device, dtype=total.dtype)
    return total


@torch.no_grad()
def project_(model: nn.Module, *, bias: bool = True) -> nn.Module:
    """Replace every attached layer's weight by P(W) in place (and, with ``bias=True``, each
    regular-field bias by its field means), making those layers exactly equivariant."""
    for _, module, sym in attached_layers(model):
        module.weight.copy_(project(module.weight, sym.group, sym.in_rep, sym.out_rep, backend=sym.backend))
        if bias:
            project_bias_(module.bias, sym)
    return model


# --- reporting -------------------------------------------------------------------------------

@torch.no_grad()
def equivariance_report(model: nn.Module) -> List[dict]:
    """One dict per attached layer: ``name``, ``type``, ``group``, ``in_rep``, ``out_rep``, ``shape``,
    ``weight_norm``, ``penalty``, ``relative`` (= ||W - P(W)|| / ||W||), ``bias_relative`` (the same
    for a regular-field bias, else None) and ``spectrum`` ({irrep name: energy}, summing to ||W||^2)."""
    rows = []
    for name, module, sym in attached_layers(model):
        w = module.weight.detach()
        pen, _ = penalty_and_energy(w, sym.group, sym.in_rep, sym.out_rep, backend=sym.backend)
        spec = spectrum(w, sym.group, sym.in_rep, sym.out_rep, backend=sym.backend)
        norm = float(w.double().norm())
        b = _bias_fields(module, sym)
        bias_rel = None
        if b is not None:
            bn = float(b.double().norm())
            bias_rel = float((b - _field_means(b)).double().norm()) / bn if bn > 0 else 0.0
        rows.append({
            "name": name or "(model)", "type": type(module).__name__, "group": sym.group,
            "in_rep": sym.in_rep, "out_rep": sym.out_rep, "shape": list(w.shape), "weight_norm": norm,
            "penalty": float(pen), "relative": (float(pen) ** 0.5 / norm) if norm > 0 else 0.0,
            "bias_relative": bias_rel,
            "spectrum": dict(zip(get_group(sym.group).irrep_names, (float(v) for v in spec))),
        })
    return rows


def format_report(report: List[dict]) -> str:
    """Render ``equivariance_report`` as an aligned text table; spectra as shares of ||W||^2."""
    head = ["layer", "type", "shape", "symmetry", "||W||", "rel. non-eq", "bias non-eq", "spectrum (share of ||W||^2)"]
    body = []
    for r in report:
        total = sum(r["spectrum"].values()) or 1.0
        spec = "  ".join(f"{k}:{v / total:<8.3g}" for k, v in r["spectrum"].items())
        body.append([r["name"], r["type"], "x".join(map(str, r["shape"])),
                     f"{r['group']} {r['in_rep']}->{r['out_rep']}", f"{r['weight_norm']:.3g}",
                     f"{r['relative']:.2e}", "-" if r["bias_relative"] is None else f"{r['bias_relative']:.2e}",
                     spec])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(row) for row in body])
