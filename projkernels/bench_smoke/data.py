"""Smoke plumes simulated with PhiFlow, cached on disk, cut into the benchmark's splits.

Each simulation is a closed square box (velocity zero on every wall, so the box itself is C4
symmetric) with a round smoke inflow and a buoyancy force along one of the four axis directions
``d_k = r^k (0, 1)``.  The inflow sits upstream of the plume, at ``centre - 0.3 L d_k + s L d_k^perp``
with a lateral offset ``s``.  Every geometric choice is made relative to ``d_k`` and the four
directions are used equally often, so with ``breaking = 0`` the set of simulations is exactly C4
symmetric (a rotated simulation is again a simulation of the set).  The buoyancy *magnitude* depends
on the direction, ``b0 (1 + breaking cos(k pi / 2))``: up strongest, down weakest, sideways in
between (the setting of Wang, Walters and Yu, ICML 2022, where buoyancy breaks rotation symmetry), so
``breaking`` sets how far the dynamics are from C4-equivariant.

Splits (every simulation runs ``warmup + frames`` steps; the first ``warmup`` are dropped):

- train: training simulations, the first ``split`` frames;
- validation: further simulations from the training distribution, the same frames (used only to
  choose lambda and similar weights);
- future: the training simulations' later frames ``[split, frames)`` (inputs and targets all later);
- domain: simulations with inflow offsets never seen in training (``|s| >= 0.2`` against
  ``|s| <= 0.15``), frames ``[0, split)``.

Samples: ``history`` consecutive velocity frames in, the next frame out.  Velocity is the
cell-centred field ``(2, L, L)``, component 0 along x (tensor dim -2), see ``symmetry``.

Generation is seeded; the result is cached under ``cache_dir`` in a file named by a content hash of
the generation config (and the PhiFlow version and this module's ``DATA_VERSION``), so a second call
with the same config loads it instead of simulating.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from typing import Dict, Optional

import numpy as np
import torch

__all__ = ["SmokeConfig", "simulate", "generate", "load_or_generate", "make_splits", "cache_key",
           "DATA_VERSION", "SPLITS"]

DATA_VERSION = 1  # raise when the simulation changes, so old caches are not reused
SPLITS = ("train", "validation", "future", "domain")


@dataclasses.dataclass(frozen=True)
class SmokeConfig:
    """What the data depend on (and nothing else: this is what the cache key hashes)."""
    size: int = 32            # grid cells per side
    frames: int = 40          # kept frames per simulation
    warmup: int = 8           # dropped first steps (the plume has not formed yet)
    split: int = 28           # frames [0, split) train / validation / domain, [split, frames) future
    train_sims: int = 8
    val_sims: int = 2
    domain_sims: int = 4
    breaking: float = 0.5     # buoyancy magnitude b0 (1 + breaking cos(k pi/2)) for direction k
    buoyancy: float = 0.5     # b0
    inflow_rate: float = 0.2
    inflow_radius: float = 0.1   # in units of the box side
    seed: int = 0

    def check(self) -> "SmokeConfig":
        if self.size < 8:
            raise ValueError(f"size: expected at least 8 cells, got {self.size}")
        if not 0 < self.split < self.frames:
            raise ValueError(f"split: expected 0 < split < frames ({self.frames}), got {self.split}")
        if min(self.train_sims, self.val_sims, self.domain_sims) < 1:
            raise ValueError("train_sims / val_sims / domain_sims: expected at least 1 each")
        if not 0 <= self.breaking < 1:
            raise ValueError(f"breaking: expected 0 <= breaking < 1, got {self.breaking}")
        return self


def _phi_version() -> str:
    import phi
    return getattr(phi, "__version__", "unknown")


def cache_key(cfg: SmokeConfig) -> str:
    payload = {"config": dataclasses.asdict(cfg), "data_version": DATA_VERSION, "phiflow": _phi_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _import_phi():
    try:
        from phi import flow
    except ImportError as err:
        from ..install_hints import extra_hint
        raise ImportError("the smoke benchmark simulates its data with PhiFlow, which is not installed "
                          f"({err}); install it: {extra_hint('smoke', ['phiflow>=3.4', 'matplotlib'])}") from None
    return flow


def simulate(directions, offsets, magnitudes, cfg: SmokeConfig, progress=None) -> np.ndarray:
    """Run one batch of simulations; returns velocity ``(sims, frames, 2, size, size)`` (float32).

    ``directions[i]`` in 0..3 (buoyancy along ``r^k (0, 1)``), ``offsets[i]`` the lateral inflow
    offset in box sides, ``magnitudes[i]`` the buoyancy magnitude.  All simulations advance together
    as one PhiFlow batch dimension (at these sizes a step costs about as much for one as for many).
    """
    flow = _import_phi()
    n = cfg.size
    k = np.asarray(directions)
    d = np.stack([-np.sin(k * math.pi / 2), np.cos(k * math.pi / 2)], -1).round()   # r^k (0, 1)
    perp = np.stack([-d[:, 1], d[:, 0]], -1)
    centre = n / 2 + n * (-0.3 * d + np.asarray(offsets)[:, None] * perp)
    force = np.asarray(magnitudes)[:, None] * d
    sims = flow.batch("sim")
    vec = flow.channel(vector="x,y")
    box = dict(x=n, y=n, bounds=flow.Box(x=n, y=n))
    smoke = flow.CenteredGrid(0, flow.extrapolation.BOUNDARY, **box)
    velocity = flow.StaggeredGrid(0, flow.extrapolation.ZERO, **box)
    inflow = cfg.inflow_rate * flow.CenteredGrid(
        flow.Sphere(center=flow.tensor(centre, sims, vec), radius=cfg.inflow_radius * n),
        flow.extrapolation.BOUNDARY, **box)
    buoy = flow.tensor(force, sims, vec)
    pressure, out = None, []
    # The default solve diverges at these sizes; CG to 1e-3 is stable.  A closed box leaves the
    # pressure defined up to a constant (rank deficiency 1), which CG handles.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PhiFlow warns about the constant pressure mode at every solve
        for step in range(cfg.warmup + cfg.frames):
            smoke = flow.advect.mac_cormack(smoke, velocity, 1) + inflow
            velocity = flow.advect.semi_lagrangian(velocity, velocity, 1) + flow.resample(smoke * buoy, to=velocity)
            # The default solve diverges at these sizes; CG to 1e-3, warm-started, is stable.  A closed
            # box leaves the pressure defined up to a constant, which CG handles.
            solve = flow.Solve("CG", 1e-3, 1e-3, max_iterations=500, rank_deficiency=0, x0=pressure)
            velocity, pressure = flow.fluid.make_incompressible(velocity, (), solve)
            if step >= cfg.warmup:
                out.append(velocity.at_centers().values.numpy("sim,vector,x,y"))
            if progress is not None:
                progress.update(1, f"simulating {n}x{n} smoke")
    return np.stack(out, 1).astype(np.float32)


def _parameters(cfg: SmokeConfig) -> Dict[str, np.ndarray]:
    """Per-simulation direction, offset and magnitude, seeded; each group uses the 4 directions evenly."""
    rng = np.random.default_rng(cfg.seed)
    groups = {"train": cfg.train_sims, "validation": cfg.val_sims, "domain": cfg.domain_sims}
    dirs, offs, role = [], [], []
    for name, count in groups.items():
        dirs.append((np.arange(count) + rng.integers(4)) % 4)
        if name == "domain":
            offs.append(rng.choice([-1.0, 1.0], count) * rng.uniform(0.2, 0.28, count))
        else:
            offs.append(rng.uniform(-0.15, 0.15, count))
        role += [name] * count
    k = np.concatenate(dirs)
    return {"directions": k, "offsets": np.concatenate(offs),
            "magnitudes": cfg.buoyancy * (1 + cfg.breaking * np.cos(k * math.pi / 2)).round(12),
            "role": np.array(role)}


def generate(cfg: SmokeConfig, progress=None) -> Dict[str, np.ndarray]:
    cfg.check()
    p = _parameters(cfg)
    velocity = simulate(p["directions"], p["offsets"], p["magnitudes"], cfg, progress)
    return {"velocity": velocity, **p}


def load_or_generate(cfg: SmokeConfig, cache_dir: Optional[str], progress=None, log=print) -> Dict[str, np.ndarray]:
    """The simulations of ``cfg``, from ``cache_dir`` when there (``cache_hit`` says which), else simulated
    and saved.  ``cache_dir=None`` never caches."""
    cfg.check()
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"smoke-{cache_key(cfg)}.npz")
        if os.path.exists(path):
            with np.load(path) as z:
                data = {k: z[k] for k in z.files}
            data["cache_hit"], data["cache_path"] = True, path
            log(f"smoke data: loaded {path}")
            return data
    t0 = time.perf_counter()
    data = generate(cfg, progress)
    seconds = time.perf_counter() - t0
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"   # written then renamed: an interrupted run leaves no half file
        np.savez_compressed(tmp, **data, config=json.dumps(dataclasses.asdict(cfg)))
        os.replace(tmp, path)
    log(f"smoke data: simulated {len(data['role'])} runs x {cfg.frames} frames of {cfg.size}x{cfg.size} "
        f"in {seconds:.1f} s" + (f", cached in {path}" if path else ""))
    data["cache_hit"], data["cache_path"], data["sim_seconds"] = False, path, seconds
    return data


def _windows(v: np.ndarray, lo: int, hi: int, history: int):
    """Samples from frames [lo, hi) of each simulation: ``history`` frames in, the next one out."""
    xs, ys, ids = [], [], []
    for t in range(lo + history, hi):
        xs.append(v[:, t - history:t].reshape(v.shape[0], -1, *v.shape[-2:]))
        ys.append(v[:, t])
        ids.append(np.stack([np.arange(v.shape[0]), np.full(v.shape[0], t)], 1))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ids)


def make_splits(data: Dict[str, np.ndarray], cfg: SmokeConfig, history: int, train_fraction: float = 1.0,
                device="cpu") -> Dict[str, Dict[str, torch.Tensor]]:
    """The four splits as ``{split: {"x", "y", "frames"}}``; ``frames`` rows are (simulation, target
    frame) with the simulation's index in the whole set.  Velocities are divided by one scalar, the
    training targets' RMS (a scalar keeps every symmetry).  ``train_fraction`` keeps the first
    ``ceil(fraction * train_sims)`` training simulations (the data-size sweep); their later frames
    stay the future split whatever the fraction."""
    if not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction: expected 0 < fraction <= 1, got {train_fraction}")
    if history < 1 or history >= cfg.split - 1 or history >= cfg.frames - cfg.split:
        raise ValueError(f"history: expected 1 <= history < split - 1 and < frames - split, got {history}")
    v, role = data["velocity"], data["role"]
    idx = {name: np.flatnonzero(role == name) for name in ("train", "validation", "domain")}
    n_train = max(1, math.ceil(train_fraction * len(idx["train"])))
    parts = {"train": (idx["train"][:n_train], 0, cfg.split), "validation": (idx["validation"], 0, cfg.split),
             "future": (idx["train"], cfg.split, cfg.frames), "domain": (idx["domain"], 0, cfg.split)}
    out = {}
    for name, (sims, lo, hi) in parts.items():
        x, y, fr = _windows(v[sims], lo, hi, history)
        fr[:, 0] = sims[fr[:, 0]]
        out[name] = {"x": torch.from_numpy(x), "y": torch.from_numpy(y), "frames": torch.from_numpy(fr)}
    scale = float(out["train"]["y"].square().mean().sqrt())
    for split in out.values():
        split["x"] = (split["x"] / scale).to(device)
        split["y"] = (split["y"] / scale).to(device)
    out["scale"] = scale
    return out
