"""Validation: sample images with the family's own pipeline during training, save grids, log them."""
