"""Storage backends that list and read dataset files (only the local filesystem for now)."""
