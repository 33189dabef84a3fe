"""Backbones, heads, losses and model surgery: plain nn.Modules and functions, no Lightning."""

# The detectors finetune.py builds (models/detectors.py). Here, not there, so that the CLI's --help can name them
# without importing torchvision's detection models.
DETECTORS = ("retinanet", "faster_rcnn", "mask_rcnn")
