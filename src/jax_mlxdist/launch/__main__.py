import sys

from jax_mlxdist.launch.cli import console

sys.exit(console())
