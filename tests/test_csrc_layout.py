"""The layout of csrc/, counted in the tree: sources by role, one layer descriptor, one autograd family.

csrc/ is organised by role (docs/design.md, "csrc by role"): ops/ (schemas and the public ops),
cpu/ (CPU kernels), cuda/ (CUDA kernels and their headers), autograd/ (the C++ autograd), include/
(headers with the math the CPU and CUDA kernels share), python/ (the Python module's bindings).
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ROLES = {"ops", "cpu", "cuda", "autograd", "include", "python"}
SOURCE_SUFFIXES = {".h", ".cuh", ".cpp", ".cu"}


def _sources():
    return sorted(p for p in CSRC.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)


def _text(paths):
    # Comments removed, so that a struct named in prose is not counted.
    out = []
    for p in paths:
        t = p.read_text()
        t = re.sub(r"/\*.*?\*/", "", t, flags=re.S)
        out.append(re.sub(r"//[^\n]*", "", t))
    return "\n".join(out)


def test_every_csrc_file_lives_in_its_role_folder():
    misplaced = [str(p.relative_to(CSRC)) for p in _sources()
                 if len(p.relative_to(CSRC).parts) != 2 or p.relative_to(CSRC).parts[0] not in ROLES]
    assert misplaced == []
    by_role = {role: {p.suffix for p in _sources() if p.relative_to(CSRC).parts[0] == role} for role in ROLES}
    assert by_role["cuda"] <= {".cu", ".cuh"} and ".cu" in by_role["cuda"]
    assert by_role["include"] <= {".h"}
    for role in ("ops", "cpu", "autograd", "python"):
        assert by_role[role] == {".cpp"}, role


def test_the_schemas_are_defined_in_one_place():
    # TORCH_LIBRARY (the schemas) once, in ops/; no other file defines a schema.  A schema is an
    # m.def of a signature string (a name and its argument list); the Python module's pybind m.def
    # of a plain name (python/, e.g. parallel_threads) defines a function, not an op.
    defining = [p.relative_to(CSRC).as_posix() for p in _sources()
                if re.search(r"\bTORCH_LIBRARY(_FRAGMENT)?\s*\(", _text([p]))
                or re.search(r'\bm\.def\(\s*"[^"]*\(', _text([p]))]
    assert defining == ["ops/schemas.cpp"]
    # Kernels registered per dispatch key by role: CPU kernels in cpu/ (and the public ops' thin
    # kernels in ops/), CUDA kernels in cuda/ (and ops/), Autograd in autograd/ alone.
    for p in _sources():
        rel, text = p.relative_to(CSRC), _text([p])
        for key in re.findall(r"TORCH_LIBRARY_IMPL\s*\(\s*projkernels_C\s*,\s*(\w+)", text):
            allowed = {"CPU": {"cpu", "ops"}, "CUDA": {"cuda", "ops"}, "Autograd": {"autograd"}}[key]
            assert rel.parts[0] in allowed, (rel, key)


def test_one_layer_descriptor_struct():
    # The one struct every orbit-walking kernel reads (penalty, projection, multi-tensor, decay).
    text = _text(_sources())
    assert len(re.findall(r"\bstruct\s+LayerDesc\s*\{", text)) == 1
    # No second per-layer descriptor: the decay's former `Layer` is gone, and no other *Desc struct.
    descriptors = re.findall(r"\bstruct\s+(\w*(?:Desc|Layer))\s*\{", text)
    assert descriptors == ["LayerDesc"]
    # The decay's kernels take the descriptors as a kernel argument, not from pinned memory.
    decay = _text([CSRC / "cuda" / "decay_kernels.cu"])
    assert "pinned_memory" not in decay and "LaunchLayers" in decay


def test_the_schema_lists_are_read_by_position_in_one_header():
    # table[k] / geometry[k] (the schemas' Tensor[] and int[] lists) appear only in tables.h, where
    # they are turned into named structs, and in the multi-tensor check that names each layer's ints.
    readers = sorted({p.relative_to(CSRC).as_posix() for p in _sources()
                      if re.search(r"\b(table|geometry)\[\d", _text([p]))})
    assert readers == ["include/tables.h"]


def test_one_autograd_function_family_for_the_single_weight_ops():
    autograd = sorted(p.relative_to(CSRC).as_posix() for p in _sources()
                      if "torch::autograd::Function<" in _text([p]))
    assert autograd == ["autograd/autograd.cpp"]
    text = _text([CSRC / "autograd" / "autograd.cpp"])
    # Written once: the three nodes of a single-weight op and its Autograd-key kernels, templates over
    # the symmetry kind; each kind only names its instances (the node names a graph shows).
    for family in ("PenaltyEnergyNode", "BackwardNode", "ProjectNode"):
        assert len(re.findall(r"template\s*<typename Kind, typename Self>\s*class\s+%s\b" % family, text)) == 1
    assert len(re.findall(r"\bstruct\s+SingleWeight\s*\{", text)) == 1
    direct = re.findall(r"class\s+(\w+)\s*:\s*public\s+torch::autograd::Function<(\w+)>", text)
    assert sorted(direct) == [("BackwardNode", "Self"), ("MultiPenaltyBackwardFn", "MultiPenaltyBackwardFn"),
                              ("MultiPenaltyFn", "MultiPenaltyFn"), ("PenaltyEnergyNode", "Self"),
                              ("ProjectNode", "Self")]
    instances = re.findall(r"class\s+(\w+)\s*:\s*public\s+(\w+Node)<(\w+),\s*\1>\s*\{\s*\}", text)
    assert {kind for _, _, kind in instances} == {"FiniteGroup", "Steerable"} and len(instances) == 6
    assert text.count("SingleWeight<FiniteGroup,") == 1 and text.count("SingleWeight<Steerable,") == 1
