"""attnseg.engines."""
