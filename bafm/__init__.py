"""bafm: Bi-Anchor Interpolation Solver (BA-solver) for flow-matching generators."""

__version__ = "0.1.0"
