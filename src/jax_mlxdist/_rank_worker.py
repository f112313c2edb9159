"""Child side of jax_mlxdist.testing.run_ranks: run one pickled function, pickle the outcome.

Under mpirun the paths hold "{rank}" (filled from Open MPI's rank) and the rank writes its own
output file, since mpirun would mix the ranks' output.
"""

import os
import sys
import traceback

import cloudpickle


def _to_numpy(value):
    """jax arrays inside containers become numpy arrays: the parent needs no JAX backend."""
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_to_numpy(v) for v in value)
    if type(value).__module__.startswith("jax"):
        import numpy as np
        return np.asarray(value)
    return value


def main(payload_path: str, result_path: str) -> int:
    with open(payload_path, "rb") as f:
        fn, args, kwargs = cloudpickle.load(f)
    try:
        value = fn(*args, **kwargs)
        outcome = ("ok", _to_numpy(value))
        code = 0
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the parent
        outcome = ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
        code = 1
    with open(result_path, "wb") as f:
        cloudpickle.dump(outcome, f)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    payload, result, *output = sys.argv[1:]
    if "{rank}" in result:
        rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0"))
        result = result.replace("{rank}", rank)
        if output:
            fd = os.open(output[0].replace("{rank}", rank), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
    sys.exit(main(payload, result))
