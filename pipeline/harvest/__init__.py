"""Harvesting: the attention processors that observe a denoiser's cross-attention, the
running per-stride class maps (AttentionHarvester), and the maps turned into masks."""
