"""Built-in stages; importing this package registers them."""

from deploykit.stages import (  # noqa: F401
    benchmark,
    deploy,
    distill,
    export,
    load,
    prune,
    quantize,
    report,
    tensorrt,
    train,
)
