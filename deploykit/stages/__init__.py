"""Built-in stages; importing this package registers them."""

from deploykit.stages import train  # noqa: F401
