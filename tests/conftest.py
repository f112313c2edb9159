import os

# Ranks and the test process run JAX on the CPU; keep each rank's thread pool small on 2 cores.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
