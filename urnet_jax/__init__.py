"""urnet-jax: UR-Net, joint image enhancement and classification of white blood cells, in JAX/Flax."""

__version__ = "0.1.0"
