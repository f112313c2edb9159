import sys

from jax_mlxdist.launch.cli import main

sys.exit(main())
