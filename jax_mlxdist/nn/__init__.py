"""Gradient helpers and (soon) tensor-parallel layers, in plain JAX on top of the collectives."""

from jax_mlxdist.nn._gradients import sum_gradients

__all__ = ["sum_gradients"]
