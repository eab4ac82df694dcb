"""The axis names of every volume, in storage order: slices are taken along any of them."""

AXES = ("z", "y", "x")
