"""Pallas kernels with pure-jnp references (``tree_attention``: tree-masked attention)."""
