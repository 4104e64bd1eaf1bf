"""eqr-jax: Equilibrium Reasoners in JAX/Flax."""

__version__ = "0.1.0"
