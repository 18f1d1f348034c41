"""The package's layout, counted in the tree (docs/design.md, "The map"): import floors with no
circle and no import that runs back up, symmetry kinds told apart only inside projkernels/symmetry/,
one backend resolver, one file of fake kernels, the penalty family's Python autograd in one module, and a backend added from outside the package by name alone."""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest
import torch

import projkernels as pk
from projkernels.backends import Backend, BACKENDS, register_backend, unregister_backend
from projkernels.backends import reference as R

PKG = Path(pk.__file__).resolve().parent

# The floors, lowest first: a module may import modules of its own floor or below, never above.
# Patterns are module names relative to the package (``a.b`` for a/b.py, ``a`` for a/__init__.py).
FLOORS = [
    ["groups", "reps", "install_hints"],                                # 0: the groups, their field types
    ["orbits"],                                                         # 1: orbit tables
    ["library", "library.autograd", "library.fakes"],                   # 2: Python autograd, fakes
    ["symmetry", "symmetry.*"],                                         # 3: symmetry kinds
    ["distributed", "backends.registry"],                               # 4: sharding; the registry
    ["backends", "backends.*"],                                         # 5: the backends
    ["library.custom_ops", "library.multi_autograd", "library.functional"],  # 6: compile, multi, func
    ["dispatch", "dispatch.*"],                                         # 7: configurations, plans
    ["api"],                                                            # 8: single weights
    ["model"],                                                          # 9: whole models
    ["decay", "escnn_interop"],                                         # 10: optimizer, interop
    ["", "__main__", "demo", "demo.*", "bench_smoke", "bench_smoke.*", "integrations", "integrations.*"],  # 11: users
]

# The classes that tell symmetry kinds apart; only projkernels/symmetry/ may test for them.
KIND_CLASSES = {"SteerableSymmetry", "FiniteKind", "SteerableKind"}


def _modules():
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, level: int, name: str) -> str:
    """The package-relative name of ``from <level dots><name>`` inside ``module``."""
    base = module.split(".") if module else []
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(module: str, path: Path):
    """Every import of another projkernels module (top-level and inside functions), as targets; the
    packages above a target count too, since importing it runs their __init__ (except the root and
    the packages that hold ``module`` itself, which are running already)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("projkernels"):
                    continue
                base = node.module[len("projkernels"):].lstrip(".")
            else:
                base = _resolve(module, is_package, node.level, node.module or "")
            names.append(base)
            names += [f"{base}.{a.name}" if base else a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name[len("projkernels"):].lstrip(".") for a in node.names if a.name.startswith("projkernels")]
        for n in names:
            if n in MODULES and n != module:
                targets.add(n)
                parts = n.split(".")
                targets.update(".".join(parts[:i]) for i in range(1, len(parts)))
    own = module.split(".")
    return {t for t in targets if t and t != module and t not in {".".join(own[:i]) for i in range(1, len(own))}}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _floor(module: str) -> int:
    for i, patterns in enumerate(FLOORS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"projkernels/{module}: no floor; add it to FLOORS (and to docs/design.md's map)")


def _cycles():
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles() == []


def test_every_module_has_a_floor_and_no_import_runs_back_up():
    up = [(m, t) for m, ts in GRAPH.items() for t in ts if _floor(t) > _floor(m)]
    assert up == [], "imports that run back up: " + ", ".join(f"{m} -> {t}" for m, t in up)


def _calls_on_kinds(tree):
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass"):
            classes = node.args[1] if len(node.args) > 1 else None
            names = {n.id for n in ast.walk(classes) if isinstance(n, ast.Name)} | \
                    {n.attr for n in ast.walk(classes) if isinstance(n, ast.Attribute)} if classes is not None else set()
            if names & KIND_CLASSES:
                found.append(node.lineno)
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            if names & KIND_CLASSES and any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "type"
                                            for n in ast.walk(node)):
                found.append(node.lineno)
    return found


def test_symmetry_kinds_are_told_apart_only_inside_the_symmetry_package():
    outside = [(m, line) for m, p in MODULES.items() if not (m == "symmetry" or m.startswith("symmetry."))
               for line in _calls_on_kinds(ast.parse(p.read_text()))]
    assert outside == []
    inside = [line for m, p in MODULES.items() if m.startswith("symmetry")
              for line in _calls_on_kinds(ast.parse(p.read_text()))]
    assert len(inside) == 1  # kinds.kind_of


def _defs(pred):
    return [(m, n.name) for m, p in MODULES.items() for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and pred(n)]


def _uses(name):
    return sorted({m for m, p in MODULES.items() for n in ast.walk(ast.parse(p.read_text()))
                   if (isinstance(n, ast.Name) and n.id == name) or (isinstance(n, ast.Attribute) and n.attr == name)})


def test_one_backend_resolver():
    assert _defs(lambda n: n.name.lstrip("_") in ("resolve", "resolve_backend", "choose")) == [
        ("backends.registry", "resolve")]
    # The per-device "auto" order is read in one module only.
    assert _uses("AUTO_ORDER") == ["backends.registry"]


def test_one_file_of_fake_kernels():
    assert _uses("register_fake") == ["library.fakes"]


def test_the_penalty_familys_python_autograd_lives_in_library():
    functions = _defs(lambda n: isinstance(n, ast.ClassDef) and any(
        ast.unparse(b).endswith("autograd.Function") for b in n.bases))
    where = sorted({m for m, _ in functions})
    # library.autograd: every Python route of one weight or a stack of them (eager and torch.func);
    # library.multi_autograd: many weights; distributed: the all-reduce and gradient scaling.
    assert where == ["distributed", "library.autograd", "library.multi_autograd"]
    # The single-weight family (penalty and energy, their gradient, the projection) once, for the
    # eager route and the torch.func route alike (stacks of weights go through the same Functions).
    penalty = sorted((m, n) for m, n in functions if m != "library.multi_autograd" and m != "distributed")
    assert penalty == [("library.autograd", n) for n in ("_Gradient", "_PenaltyEnergy", "_Project")]
    custom_ops = [m for m in MODULES if any(isinstance(n, ast.Attribute) and n.attr == "custom_op"
                                            for n in ast.walk(ast.parse(MODULES[m].read_text())))]
    assert custom_ops == ["library.custom_ops"]


# --- a backend from outside the package ------------------------------------------------------------

class _Counting:
    """The reference kernels behind a call counter."""

    def __init__(self):
        self.calls = {}

    def wrap(self, name, fn):
        def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return call


@pytest.fixture
def mybackend():
    c = _Counting()
    register_backend(Backend(
        name="mybackend",
        forward=c.wrap("forward", R.forward), backward=c.wrap("backward", R.backward),
        project=c.wrap("project", R.project), spectrum=c.wrap("spectrum", R.spectrum),
        why_unavailable=lambda device: None,
        decay=c.wrap("decay", R.decay_apply),
    ))
    try:
        yield c
    finally:
        unregister_backend("mybackend")
    assert "mybackend" not in BACKENDS


def test_a_backend_registered_from_outside_serves_by_name(mybackend):
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    spec = ("D4", "regular", "regular")
    pen = pk.projected_penalty(w, *spec, backend="mybackend")
    ref = pk.projected_penalty(w, *spec, backend="reference")
    torch.testing.assert_close(pen, ref, rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(pen, w)
    torch.testing.assert_close(g, torch.autograd.grad(ref, w)[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(pk.project(w, *spec, backend="mybackend"), pk.project(w, *spec, backend="reference"))
    pk.spectrum(w, *spec, backend="mybackend")
    assert {k: mybackend.calls[k] > 0 for k in ("forward", "backward", "project", "spectrum")} == dict.fromkeys(
        ("forward", "backward", "project", "spectrum"), True)

    before = mybackend.calls["forward"]
    w2 = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    total, _, per, _ = pk.multi_penalty([(w, *spec), (w2, "C4", "regular", "trivial")], backend="mybackend")
    assert mybackend.calls["forward"] == before + 2  # layer by layer: it has no multi-tensor kernels
    torch.testing.assert_close(total, pk.multi_penalty([(w, *spec), (w2, "C4", "regular", "trivial")],
                                                       backend="reference")[0], rtol=1e-12, atol=0)
    total.backward()

    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, bias=False), torch.nn.Conv2d(8, 8, 3)).double()
    pk.attach_symmetry(model[0], "C4", "trivial", "regular", backend="mybackend")
    pk.attach_symmetry(model[1], "C4", "regular", "regular", backend="mybackend")
    before = mybackend.calls["forward"]
    mp = pk.model_penalty(model)
    assert mybackend.calls["forward"] == before + 2
    mp.backward()
    for l in model:
        pk.attach_symmetry(l, pk.get_symmetry(l).group, pk.get_symmetry(l).in_rep, pk.get_symmetry(l).out_rep)
    torch.testing.assert_close(mp, pk.model_penalty(model), rtol=1e-12, atol=0)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pk.equivariance_decay(opt, model, 0.1, backend="mybackend")
    opt.step()
    assert mybackend.calls["decay"] == 1


def test_a_registered_backend_without_stack_kernels_serves_torch_func(mybackend):
    # No StackKernels: a vmapped batch runs entry by entry through its single-weight kernels, and a
    # hessian (a vmap inside the backward) works on its eager route; both equal the reference's.
    from torch.func import hessian, vmap
    spec = ("C4", "regular", "regular")
    wb = torch.randn(3, 8, 8, 3, 3, dtype=torch.float64)
    before = mybackend.calls.get("forward", 0)
    got = vmap(lambda w: pk.projected_penalty(w, *spec, backend="mybackend"))(wb)
    assert mybackend.calls["forward"] == before + 3
    want = torch.stack([pk.projected_penalty(w, *spec, backend="reference") for w in wb])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    w = torch.randn(4, 4, dtype=torch.float64)
    h = hessian(lambda x: pk.projected_penalty(x, "C4", "regular", "trivial", backend="mybackend"))(w)
    # penalty = ||W - P W||^2, so the Hessian is 2 (I - P): check it on a direction
    d = torch.randn(4, 4, dtype=torch.float64)
    hd = torch.einsum("ijkl,kl->ij", h, d)
    torch.testing.assert_close(hd, 2 * (d - pk.project(d, "C4", "regular", "trivial", backend="reference")),
                               rtol=1e-10, atol=1e-12)


def test_an_unknown_backend_name_is_refused_and_a_registered_one_accepted(mybackend):
    from projkernels.backends import check_backend_name
    assert check_backend_name("mybackend") == "mybackend"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        pk.projected_penalty(torch.randn(4, 4), "C4", backend="nope")
    with pytest.raises(RuntimeError, match="backend='mybackend' cannot serve this steerable symmetry"):
        from projkernels.backends import resolve
        resolve("mybackend", "cpu", "steerable")
