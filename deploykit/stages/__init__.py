"""Built-in stages; importing this package registers them."""

from deploykit.stages import export, quantize, tensorrt, train  # noqa: F401
