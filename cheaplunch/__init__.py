"""cheaplunch: cheap pre-training of vision backbones on the user's own detection/segmentation data."""
