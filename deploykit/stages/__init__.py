"""Built-in stages; importing this package registers them."""

from deploykit.stages import benchmark, export, load, quantize, report, tensorrt, train  # noqa: F401
