"""The one exception type for communication failures."""

import jax

# The prefix the C++ side puts on every failure it reports through XLA.
_MARK = "DistributedError: "


class DistributedError(jax.errors.JaxRuntimeError):
    """A collective failed: bad arguments, a mismatch across ranks, a lost or stalled peer.

    It subclasses JAX's runtime error, so ``except jax.errors.JaxRuntimeError`` also catches it.
    Failures inside a jitted program surface when its result is used, as a JaxRuntimeError whose
    text starts with ``DistributedError:``; :func:`is_distributed_error` recognises those.
    """


class DistributedValueError(DistributedError, ValueError):
    """A bad argument value (a rank out of range, an unknown op, shapes that cannot work).

    Both a DistributedError and the ValueError MLX and JAX raise for it, so code written
    ``except ValueError`` (for MLX) and ``except dist.DistributedError`` both catch it."""


class DistributedTypeError(DistributedError, TypeError):
    """An argument of the wrong type (a group that is not a Group, a dtype the op does not
    take); both a DistributedError and a TypeError."""


def is_distributed_error(exc: BaseException) -> bool:
    """True for DistributedError and for JAX runtime errors carrying one from a jitted program."""
    return isinstance(exc, DistributedError) or _MARK in str(exc)


def translate(exc: BaseException) -> BaseException:
    """The DistributedError for a runtime error that carries one, else exc itself."""
    if isinstance(exc, DistributedError) or _MARK not in str(exc):
        return exc
    text = str(exc)
    return DistributedError(text[text.index(_MARK) + len(_MARK):])


def raise_translated(exc: BaseException):
    """Raises the DistributedError exc carries (without JAX's wrapping), else exc itself.

    JAX raises a failure found while a program is dispatched as a ValueError from its C++
    dispatch, and one found later as a JaxRuntimeError; both carry our text."""
    error = translate(exc)
    if error is exc:
        raise exc
    raise error from None
