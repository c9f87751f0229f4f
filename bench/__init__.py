"""attnseg.bench."""
