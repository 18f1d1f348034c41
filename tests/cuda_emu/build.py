"""Builds a CUDA source of csrc/cuda/ as a CPU torch extension over the emulated device (cuda_emu.h).

``load("steerable_kernels.cu")`` rewrites the file (the launches ``k<<<grid, block, shared,
stream>>>(args)`` into ``cuda_emu::launch`` calls that evaluate the arguments once, dynamic shared
memory into the emulated block's buffer, static ``__shared__`` variables into statics, which is
right because blocks run one at a time) and registers its host functions, unchanged, as the ops of
a library of its own, ``projkernels_emu_<name>`` with the schemas inferred from their C++ types,
so the CPU tests can call the CUDA code path on CPU tensors next to the real CPU kernels.  The
emulated device's headers (tests/cuda_emu/shim) stand in for the CUDA runtime's.

The project's code is compiled as nvcc's device pass sees it: ``__CUDACC__`` and ``__CUDA_ARCH__``
are defined for csrc/ (after the library headers, which are included first, so torch's own headers
keep their host form), so the device-only branches of the headers (``loop_bound``'s loops to the
unrolled bound, PK_UNROLL's predicated iterations) are the ones that run here, as on a GPU.

$PROJKERNELS_EMU_CSRC names another source directory to compile instead of csrc/ (a copy with one
change, to check that a test catches that change without touching csrc/).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Optional

HERE = Path(__file__).resolve().parent
CSRC = Path(os.environ.get("PROJKERNELS_EMU_CSRC", HERE.parents[1] / "csrc")).resolve()
# Where the build finds the CUDA sources, and the headers they include (csrc/ by role: the shared
# math in include/, the CUDA-only headers next to the kernels in cuda/).
_KERNEL_DIR = "cuda"
_HEADER_DIRS = ("include", "cuda")

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[\w:, ]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]*?\w)\s+(\w+)\[\]\s*;")
_STATIC_SHARED = re.compile(r"(?<!extern )__shared__\s+([\w:<> ]*?\w)\s+(\w+)((?:\[[^\]]+\])+)\s*;")
_REGISTRATION = "TORCH_LIBRARY_IMPL(projkernels_C, CUDA, m)"
_SYSTEM_INCLUDE = re.compile(r"^\s*#\s*include\s*<([^>]+)>", re.M)
_QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)
# What nvcc defines in its device pass (sm_80): the csrc/ headers choose their device branches by it.
_DEVICE_PASS = "#define __CUDACC__ 1\n#define __CUDA_ARCH__ 800\n"
# Ops of every emulated library that set and read the emulated device.
_CONTROLS = """
  m.def("emu_set_shared_limit", [](int64_t bytes) { ::cuda_emu::set_shared_limit(bytes); });
  m.def("emu_launch_count", []() -> int64_t { return ::cuda_emu::launch_count(); });
"""


def _close(src: str, i: int, open_c: str, close_c: str) -> int:
    """Index of the bracket that closes the one at src[i]."""
    depth = 0
    for j in range(i, len(src)):
        if src[j] == open_c:
            depth += 1
        elif src[j] == close_c:
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced {open_c!r} at offset {i}")


def _split_top(s: str):
    """Comma-separated parts of s, not splitting inside (), <> or {}."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "(<{":
            depth += 1
        elif ch in ")>}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def _launches(src: str) -> str:
    out, pos = [], 0
    while (m := _LAUNCH.search(src, pos)) is not None:
        paren = m.end() - 1
        end = _close(src, paren, "(", ")")
        name = m.group(1)
        config = _split_top(" ".join(m.group(2).split()))
        config += ["0", "nullptr"][len(config) - 2:]
        args = " ".join(src[paren + 1:end].split())
        out.append(src[pos:m.start()])
        out.append(f'::cuda_emu::launch("{name}", {", ".join(config)}, '
                   f'[&, projkernels_emu_args = std::make_tuple({args})] {{ '
                   f'std::apply([&](const auto&... projkernels_emu_a) {{ {name}(projkernels_emu_a...); }}, projkernels_emu_args); }})')
        pos = end + 1
    out.append(src[pos:])
    return "".join(out)


def _library_includes(src: str, headers: Dict[str, str]):
    """The <...> includes of src and of the quoted headers it reaches, in order of appearance."""
    found, seen, todo = {}, set(), [src]
    while todo:
        text = todo.pop(0)
        found.update(dict.fromkeys(_SYSTEM_INCLUDE.findall(text)))
        for name in _QUOTED_INCLUDE.findall(text):
            if name in headers and name not in seen:
                seen.add(name)
                todo.append(headers[name])
    return list(found)


def rewrite(src: str, library: str, headers: Optional[Dict[str, str]] = None) -> str:
    """The emulated form of a .cu file's text (see the module docstring).  ``headers`` ({name:
    text}): the headers it may include, whose library includes come ahead of the device pass."""
    src = _launches(src)
    src = _EXTERN_SHARED.sub(r"\1* const \2 = reinterpret_cast<\1*>(::cuda_emu::dynamic_shared());", src)
    src = _STATIC_SHARED.sub(r"static \1 \2\3; ::cuda_emu::shared_static(\2, sizeof(\2));", src)
    if re.search(r"\b__shared__\b", src):
        raise ValueError("a __shared__ declaration the rewrite does not know (expected `__shared__ T name[N];`)")
    at = src.index(_REGISTRATION)
    brace = src.index("{", at)
    end = _close(src, brace, "{", "}")
    body = src[brace:end].replace("m.impl(", "m.def(") + _CONTROLS + "}"
    src = src[:at] + f"TORCH_LIBRARY({library}, m) " + body + src[end + 1:]
    # Every library header any of the sources includes comes first, with the host's view of the
    # macros; their include guards keep the later includes of them (now in the device pass) empty.
    prelude = "".join(f"#include <{h}>\n" for h in _library_includes(src, headers or {}))
    return '#include "cuda_emu.h"\n#include <tuple>\n' + prelude + _DEVICE_PASS + src


def _substitute(text: str, name: str, substitutions: Dict[str, str]) -> str:
    for old, new in substitutions.items():
        if old not in text:
            raise ValueError(f"{name}: {old!r} not found (the substitution would change nothing)")
        text = text.replace(old, new)
    return text


def load(cu_file: str, variant: str = "", substitutions: Optional[Dict[str, str]] = None,
         header_substitutions: Optional[Dict[str, Dict[str, str]]] = None, verbose: bool = False):
    """Compile ``cu_file`` (a file of csrc/cuda/, or a path) for the emulated device and return its ops,
    ``torch.ops.projkernels_emu_<stem>[_<variant>]``.  ``substitutions`` replace text of the source
    before the rewrite (a variant's switch); ``header_substitutions`` ({header of csrc/: {old:
    new}}) do the same in that header of the copy of csrc/ the build compiles.  A variant name stands
    for one set of substitutions (the library is loaded once per process).  The build is cached by torch's extension builder, in build/cuda_emu/ of
    the repository (or $PROJKERNELS_EMU_BUILD)."""
    import torch
    from torch.utils import cpp_extension

    path = Path(cu_file) if os.sep in cu_file else CSRC / _KERNEL_DIR / cu_file
    stem = path.stem + (f"_{variant}" if variant else "")
    library = f"projkernels_emu_{stem}"
    build = Path(os.environ.get("PROJKERNELS_EMU_BUILD", HERE.parents[1] / "build" / "cuda_emu")) / stem
    build.mkdir(parents=True, exist_ok=True)
    # The build compiles a copy of csrc/'s headers, flattened into one folder (substituted where
    # asked), and the rewritten source, so every quoted include of the copy finds the copy.
    sources = build / "csrc"
    sources.mkdir(exist_ok=True)
    header_substitutions = dict(header_substitutions or {})
    files = {h.name: h.read_text() for d in _HEADER_DIRS for h in sorted((CSRC / d).iterdir())
             if h.suffix in (".h", ".cuh")}
    for header, subs in header_substitutions.items():
        files[header] = _substitute(files[header], header, subs)
    files[f"{stem}_emu.cpp"] = rewrite(_substitute(path.read_text(), path.name, substitutions or {}), library, files)
    for stale in sources.iterdir():  # a header since removed from csrc/ must not stay includable
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        target = sources / name
        if not target.exists() or target.read_text() != text:  # unchanged files keep their times
            target.write_text(text)
    source = sources / f"{stem}_emu.cpp"
    cpp_extension.load(name=library, sources=[str(source)],
                       extra_include_paths=[str(HERE / "shim"), str(HERE), str(sources)],
                       extra_cflags=["-O1", "-Wno-unknown-pragmas"], build_directory=str(build),
                       is_python_module=False, verbose=verbose)
    return getattr(torch.ops, library)
