"""meshscale: re-parallelize a running JAX training job when its accelerators change."""
