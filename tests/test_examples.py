"""The README's code blocks are the files under examples/, and those files run."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))


def _readme_python_blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        return re.findall(r"^```python\n(.*?)^```$", fh.read(), flags=re.S | re.M)


def test_every_readme_python_block_is_an_example_file_verbatim():
    blocks = _readme_python_blocks()
    assert blocks, "README.md has no python blocks"
    shown = set()
    for block in blocks:
        first = block.splitlines()[0]
        m = re.match(r"# (examples/[\w.]+\.py)", first)
        assert m, f"a README python block does not start with '# examples/<file>.py': {first!r}"
        with open(os.path.join(ROOT, m.group(1)), encoding="utf-8") as fh:
            assert block == fh.read(), f"README's copy of {m.group(1)} differs from the file"
        shown.add(os.path.basename(m.group(1)))
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        named = set(re.findall(r"examples/([\w.]+\.py)", fh.read()))
    # Every example is shown in full or named by path in the README, and nothing shown is missing.
    assert shown <= set(EXAMPLES) and set(EXAMPLES) <= shown | named, (shown, named)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join("examples", name)], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), f"{name} printed nothing"
