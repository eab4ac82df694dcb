"""Opening, converting and writing volumes."""
