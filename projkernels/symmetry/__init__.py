"""Symmetries: finite groups (projkernels/groups.py, described per layer by orbit tables) and
steerable bases (escnn).  Each kind implements one protocol (``kinds.kind_of``); nothing outside
this package tells kinds apart."""
from .kinds import FINITE, STEERABLE, FiniteKind, SteerableKind, kind_of
from .steerable import SteerableSymmetry, steerable

__all__ = ["kind_of", "FiniteKind", "SteerableKind", "FINITE", "STEERABLE", "SteerableSymmetry", "steerable"]
