"""Training and evaluation of a segmenter on synthetic (and real) data: data sources,
sample streams, segmenter models, the robust losses, the trainer and mIoU evaluation."""
