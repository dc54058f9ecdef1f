"""Built-in stages; importing this package registers them."""

from deploykit.stages import benchmark, distill, export, load, prune, quantize, report, tensorrt, train  # noqa: F401
