"""The SPEC matrix of (group, weight shape, in_rep, out_rep) cases shared by the test files."""
import itertools

from projkernels.groups import get_group
from projkernels.orbits import field_size

REP_PAIRS = list(itertools.product(("trivial", "regular"), repeat=2))  # (in_rep, out_rep)


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


def case_id(case):
    group, shape, ir, orr = case
    return f"{group}-{'x'.join(map(str, shape))}-{ir[:3]}-{orr[:3]}"
