"""Seeds derived from (base seed, index): the one rule that makes samples, training steps and
real-image draws independent of batch size, sharding and resume."""

from __future__ import annotations

import numpy as np


def sample_seed(base_seed: int, index: int) -> int:
    """The seed of item `index` (a sample, a training step, an image): a function of
    (base seed, index) only."""
    state = np.random.SeedSequence([base_seed & 0xFFFFFFFF, index]).generate_state(2)
    return int(state[0]) | (int(state[1]) & 0x7FFFFFFF) << 32
