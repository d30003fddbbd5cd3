"""Coverage-guided fuzz targets (atheris) for every parser of outside input, and their corpora."""
