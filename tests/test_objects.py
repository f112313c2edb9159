"""Python objects between real subprocess ranks: broadcast_object, all_gather_object,
send_object/recv_object, and their errors."""

from jax_mlxdist.testing import run_ranks


def body_objects():
    import jax
    import numpy as np
    import jax_mlxdist as dist
    from jax_mlxdist.testing import attempt
    g = dist.init()
    r, n = g.rank(), g.size()
    out = {}
    config = {"seed": 7, "files": [f"shard-{i}.bin" for i in range(3)], "lr": 3e-4} if r == 1 else None
    out["broadcast"] = dist.broadcast_object(config, root=1)
    out["gathered"] = dist.all_gather_object([r] * r if r else None)
    # Larger than any socket or shared-memory buffer, passed round the ring (send first).
    big = np.full(3 << 20, r, np.uint8)
    dist.send_object({"from": r, "data": big}, (r + 1) % n)
    got = dist.recv_object((r - 1) % n)
    out["ring"] = (got["from"], int(got["data"].sum()), got["data"].size)
    # Errors: inside a traced function; an object that does not pickle (its peers hear of it).
    out["traced"] = attempt(lambda: jax.jit(lambda x: dist.all_gather_object(1) or x)(1.0))[0]
    out["unpicklable"] = attempt(lambda: dist.broadcast_object(
        (lambda: 0) if r == 0 else None, root=0))[0]
    out["after"] = dist.all_gather_object(r)  # the group stays usable after a bad argument
    return out


def test_objects_between_ranks():
    n = 3
    for r, out in enumerate(run_ranks(body_objects, n)):
        assert out["broadcast"] == {"seed": 7, "files": ["shard-0.bin", "shard-1.bin",
                                                          "shard-2.bin"], "lr": 3e-4}
        assert out["gathered"] == [None, [1], [2, 2]]
        left = (r - 1) % n
        assert out["ring"] == (left, left * (3 << 20), 3 << 20)
        assert "all_gather_object" in out["traced"] and "all_gather" in out["traced"], out
        assert out["unpicklable"] is not None and "pickle" in out["unpicklable"], out
        if r != 0:
            assert "rank 0" in out["unpicklable"], out
        assert out["after"] == [0, 1, 2]
