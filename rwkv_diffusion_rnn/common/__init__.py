"""The bottom layer: what every other layer may use (the project's error types, atomic file
writes, the safe-loading check for pickled files). Imports nothing from the project."""
