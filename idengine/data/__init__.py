"""Data preparation: load -> clean -> splits -> tokenize."""
