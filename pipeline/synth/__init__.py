"""Synthesis: the job that generates images with their masks, and what it writes (the VOC
layout, WebDataset chunks, the report page), sharded and launched at scale."""
