"""mini_o3_jax: Mini-o3 visual-search agents in JAX/Flax."""

__version__ = "0.1.0"
