"""Built-in stages, one module each; pyproject.toml registers them in the `deploykit.stages` entry-point group."""
