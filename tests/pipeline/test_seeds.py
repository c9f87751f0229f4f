"""Seeds from (base seed, index) (pipeline/seeds.py)."""

from __future__ import annotations

from attnseg.pipeline.seeds import sample_seed


def test_a_seed_depends_on_base_and_index_only():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    seeds = {sample_seed(base, i) for base in (0, 1) for i in range(1000)}
    assert len(seeds) == 2000  # distinct across indices and bases
    assert all(0 <= s < 2**63 for s in seeds)  # fits torch.Generator.manual_seed
    assert sample_seed(-1, 3) == sample_seed(2**32 - 1, 3)  # the base is taken mod 2^32
