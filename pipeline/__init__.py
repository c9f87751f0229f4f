"""attnseg.pipeline."""
