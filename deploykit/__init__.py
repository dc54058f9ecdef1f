"""deploykit: train, compress, export, serve and validate PyTorch models from one YAML pipeline.

`deploykit.optimize(...)` (deploykit/api.py) is the Python face of the same engine as `deploykit optimize`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Deployable", "Result", "optimize"]


def __getattr__(name: str) -> Any:
    # Lazily: `import deploykit` (the CLI, each benchmark worker) must not pay for torch unless asked.
    if name in __all__:
        from deploykit import api

        return getattr(api, name)
    raise AttributeError(f"module 'deploykit' has no attribute {name!r}")
