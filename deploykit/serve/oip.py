"""A small Open Inference Protocol (KServe v2) JSON client: Triton's /v2 API, and the same body on TorchServe.

deploykit's TorchServe handler speaks the same JSON body at /predictions/<model>, so one client checks both.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DeploykitError
from deploykit.serve.access import KEY_ENV, KEY_FILE_ENV, TORCHSERVE_KEY_FILE_ENV, client_access
from deploykit.serve.engines import engine_traits

TORCHSERVE_INPUT_NAME = "input"  # TorchServe has no metadata to ask: the input name deploykit's handler reads


def infer_body(x: np.ndarray, input_name: str = "input", datatype: str = "FP32") -> dict[str, Any]:
    """The JSON request for one batch `x`, as the protocol writes it: shape plus flat row-major data."""
    return {"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}]}


def binary_infer_body(x: np.ndarray, input_name: str = "input", datatype: str = "FP32") -> tuple[bytes, int]:
    """Triton's binary tensor extension: a JSON header, then the raw bytes; (body, header length for the
    Inference-Header-Content-Length header). A 224x224 image as JSON text is ~1.5 MB the server must parse."""
    raw = np.ascontiguousarray(x).tobytes()
    tensor = {
        "name": input_name,
        "shape": list(x.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": len(raw)},
    }
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + raw, len(header)


def oip_body(name: str, datatype: str, sample: np.ndarray) -> bytes:
    """An Open Inference Protocol JSON request holding one sample as a batch of 1."""
    return json.dumps(infer_body(sample[None], name, datatype)).encode()


def sample_shape(dims: list[int]) -> tuple[int, ...]:
    """Per-sample shape from Triton metadata dims; deploykit's repositories batch, so dims[0] is the batch (-1)."""
    return tuple(int(d) for d in dims[1:])


def check_samples(samples: str | Path | None, shape: tuple[int, ...], model: str) -> None:
    """Refuse a samples file that is not an (N, *shape) array."""
    if samples is None:
        return
    try:
        found = tuple(np.load(samples, mmap_mode="r").shape)
    except (OSError, ValueError) as e:
        raise DeploykitError(
            f"Samples file {samples} is not a readable .npy ({e}): pass an (N, C, H, W) array."
        ) from None
    if found[1:] != shape:
        raise DeploykitError(
            f"Samples in {samples} have shape {found[1:]} per sample but model '{model}' takes {shape}: "
            "pass samples of the model's input shape."
        )


def key_refused(status: int, text: str, engine: str) -> str | None:
    """What to do when a server refused the caller's key (Triton: 403 on a restricted API; TorchServe 0.12: 400 with
    InvalidKeyException, even for /ping), or None when the answer is not a refusal of the key."""
    if engine == "torchserve" and (status in (401, 403) or "InvalidKeyException" in text):
        return f"it refused the token: set {TORCHSERVE_KEY_FILE_ENV} to the key_file.json it wrote at start"
    if status in (401, 403):
        return f"the server wants a key: set {KEY_FILE_ENV} (or {KEY_ENV}) to the one it was started with"
    return None


class OipClient:
    """HTTP JSON inference against one model of a Triton or TorchServe server."""

    def __init__(self, url: str, model: str, engine: str = "triton", timeout: float = 30.0) -> None:
        self.traits = engine_traits(engine)
        self.url, self.model, self.engine, self.timeout = url.rstrip("/"), model, engine, timeout
        self.infer_url = self.url + self.traits.infer_route(model)
        self.headers = client_access(engine).inference_headers  # the key, when the environment names one

    def request(self, path_or_url: str, body: bytes | None = None) -> tuple[int, str]:
        """(status, body text) of a GET (no body) or POST; a dropped connection is status 0 with the reason."""
        url = path_or_url if path_or_url.startswith("http") else self.url + path_or_url
        req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET", headers=self.headers)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return int(r.status), r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode(errors="replace")
        except OSError as e:
            return 0, f"{type(e).__name__}: {e}"

    def post_infer(self, body: bytes) -> tuple[int, str]:
        return self.request(self.infer_url, body)

    def infer(self, x: np.ndarray, input_name: str = "input") -> np.ndarray:
        """The first output for batch `x`, shaped as the server says."""
        status, text = self.post_infer(json.dumps(infer_body(x, input_name)).encode())
        if status != 200:
            raise DeploykitError(f"Inference on '{self.model}' at {self.infer_url} failed with {status}: {text[:300]}")
        out = json.loads(text)["outputs"][0]
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])

    def metadata(self) -> dict[str, Any]:
        status, text = self.request(f"/v2/models/{self.model}")
        if status == 0:
            raise DeploykitError(
                f"No server answers at {self.url} ({text}): start one with `deploykit serve` or fix the URL."
            )
        if status != 200:
            fix = key_refused(status, text, self.engine)
            why = f"{fix}." if fix else "is it loaded?"
            raise DeploykitError(f"Model '{self.model}' has no metadata at {self.url} ({status}): {why}")
        return json.loads(text)
