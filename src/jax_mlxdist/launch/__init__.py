"""Start N ranks of a script: ``jax-mlxdist launch -n 4 train.py`` (or python -m jax_mlxdist.launch)."""

from jax_mlxdist.launch.cli import main

__all__ = ["main"]
