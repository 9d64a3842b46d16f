"""Features: the token and embedding caches of a prepared directory, computed with Ray Data."""
