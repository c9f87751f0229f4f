"""The label values every mask, dataset and metric in attnseg shares (no torch: the torch-free
deploy runtime reads them too)."""

BACKGROUND_LABEL = 0
# Pixels left unsure (the ignore band), PASCAL VOC's void border and Cityscapes' ignored
# classes: skipped by the losses and by mIoU.
IGNORE_LABEL = 255
