"""Child side of jax_mlxdist.testing.run_ranks: run one pickled function, pickle the outcome."""

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
    sys.exit(main(sys.argv[1], sys.argv[2]))
