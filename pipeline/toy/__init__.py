"""The toy world: procedural shape scenes with exact labels, and the small text-to-image
model trained on them (`--model toy`), the ground truth behind every quality figure."""
