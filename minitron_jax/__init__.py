"""minitron-jax: Minitron pruning, distillation and quantization of Llama models in JAX."""

__version__ = "0.1.0"
