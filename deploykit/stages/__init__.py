"""Built-in stages; importing this package registers them."""

from deploykit.stages import export, tensorrt, train  # noqa: F401
