"""Our effect without JAX's runtime token: top-level collectives on JAX's C++ dispatch path.

An ordered effect costs twice at run time: JAX threads a *runtime* token through every
execution (a device_put of the last call's token per call) and keeps the program off its C++
fast path. Neither adds order to our ops: PjRt runs one thread's executions on a device in
dispatch order, XLA:GPU runs a program's thunks in schedule order, and a group is driven by one
thread. Inside a program the token still matters (XLA runs independent custom calls
concurrently), so the effect stays in every jaxpr and every nested body threads its token.

What changes is only the outermost function of a compiled program: it takes no token argument
for our effect; the first top-level collective makes the token in the program
(`stablehlo.create_token`) and the following ones chain on it, in program order. Because the
switch happens when a whole program is lowered, never when a function is traced, a jaxpr
reused inside scan or another jit keeps its token chain there (jit's trace cache cannot leak
an effect-free body into a nested position).

JAX has no public hook for this, so install() wraps three internals after checking that they
look as expected (jax 0.10 and 0.11); where they do not, it leaves JAX alone, collectives keep
JAX's runtime tokens (correct, slower per call), and it says so once on stderr.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading

import jax
import numpy as np

from jax_mlxdist._errors import raise_translated

_state = threading.local()  # depth > 0 while a whole program is being lowered
installed = False


def _strip(effects, effect):
    return [e for e in effects if e is not effect]


def _compatible(mlir, pxla) -> str:
    """'' when JAX's internals look as install() expects, else what differs."""
    if "_tokens" not in getattr(getattr(mlir, "TokenSet", None), "__slots__", ()):
        return "mlir.TokenSet has no _tokens"
    if not callable(getattr(pxla, "_cached_lowering_to_hlo", None)):
        return "pxla._cached_lowering_to_hlo is missing"
    try:
        module_params = inspect.signature(mlir.lower_jaxpr_to_module).parameters
        subcomp_params = list(inspect.signature(mlir.jaxpr_subcomp).parameters)
    except (AttributeError, TypeError, ValueError):
        return "mlir.lower_jaxpr_to_module or mlir.jaxpr_subcomp is missing"
    if "ordered_effects" not in module_params:
        return "mlir.lower_jaxpr_to_module takes no ordered_effects"
    if subcomp_params[1:4] != ["jaxpr", "name_stack", "tokens"]:
        return "mlir.jaxpr_subcomp's arguments changed"
    return ""


def install(effect) -> bool:
    """Lower programs without a runtime token for `effect`; False (and one line on stderr) when
    this JAX's internals differ."""
    global installed
    if installed:
        return True
    from jax._src.interpreters import mlir, pxla

    why = _compatible(mlir, pxla)
    if why:
        print(f"jax_mlxdist: this JAX's dispatch internals differ ({why}); collectives keep "
              "JAX's runtime tokens (about 200 us more per jitted call)", file=sys.stderr)
        return False

    lower_program = pxla._cached_lowering_to_hlo
    lower_module = mlir.lower_jaxpr_to_module
    subcomp = mlir.jaxpr_subcomp

    def cached_lowering_to_hlo(*args, **kwargs):
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            result = lower_program(*args, **kwargs)
        finally:
            _state.depth -= 1
        # (module, keepalive, host_callbacks, unordered_effects, ordered_effects, ...): the
        # executable must not feed a token the module no longer takes.
        if effect in result[4]:
            result = (*result[:4], _strip(result[4], effect), *result[5:])
        return result

    def lower_jaxpr_to_module(*args, ordered_effects, **kwargs):
        if getattr(_state, "depth", 0) and effect in ordered_effects:
            ordered_effects = _strip(ordered_effects, effect)
        return lower_module(*args, ordered_effects=ordered_effects, **kwargs)

    # The outermost function now gets no token for our effect: it makes one, and the body's
    # collectives (and nested bodies, through their token arguments) chain on it.
    def jaxpr_subcomp(ctx, jaxpr, name_stack, tokens, *args, **kwargs):
        if effect in jaxpr.effects and effect not in tokens._tokens:
            tokens = mlir.TokenSet({**tokens._tokens, effect: mlir.create_token()})
        return subcomp(ctx, jaxpr, name_stack, tokens, *args, **kwargs)

    pxla._cached_lowering_to_hlo = cached_lowering_to_hlo
    mlir.lower_jaxpr_to_module = lower_jaxpr_to_module
    mlir.jaxpr_subcomp = jaxpr_subcomp
    installed = True
    return True


_fence_program = None


def fence() -> None:
    """Returns once every program this thread dispatched before has finished.

    Programs without the runtime token leave JAX nothing to wait on (jax.effects_barrier does
    not see them); PjRt runs one thread's executions on a device in dispatch order, so a
    trivial program dispatched now finishes after all of them.
    """
    global _fence_program
    if _fence_program is None:
        _fence_program = jax.jit(lambda x: x + 1)
    jax.block_until_ready(_fence_program(np.int32(0)))


class _Jitted:
    """A jax.jit function whose calls raise DistributedError for a failed collective."""

    def __init__(self, jitted):
        self._jitted = jitted
        functools.update_wrapper(self, jitted)

    def __call__(self, *args, **kwargs):
        try:
            return self._jitted(*args, **kwargs)
        except (jax.errors.JaxRuntimeError, ValueError) as e:
            raise_translated(e)

    def __getattr__(self, name):  # lower, trace, eval_shape, clear_cache, ...
        return getattr(self._jitted, name)

    def __get__(self, obj, objtype=None):  # as a method, like jax.jit's functions
        return self if obj is None else functools.partial(self, obj)


def jit(fun=None, /, **kwargs):
    """`jax.jit` for programs with collectives: same arguments (static_argnums, donate_argnums,
    ...), same compiled program.

    Every program already lowers our token inside itself (module docstring), so a plain
    `jax.jit` takes JAX's C++ dispatch path too. What `dist.jit` adds: a collective that fails
    while the call is dispatched (its group closed or failed before) raises DistributedError
    there, where JAX's C++ dispatch raises a ValueError carrying its text. Failures found later
    surface, as with jax.jit, when the result is used. `@dist.jit` or
    `@dist.jit(static_argnums=...)`.
    """
    if fun is None:
        return lambda f: _Jitted(jax.jit(f, **kwargs))
    return _Jitted(jax.jit(fun, **kwargs))
