"""attnseg.kernels."""
