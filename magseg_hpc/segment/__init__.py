"""The Dask volume segmentation pipeline."""
