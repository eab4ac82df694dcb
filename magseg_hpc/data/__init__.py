"""Phantoms, slice datasets, normalisation, augmentations, mask import."""
