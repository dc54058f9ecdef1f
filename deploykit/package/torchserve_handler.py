"""TorchServe handler for a deploykit ONNX model: Open Inference Protocol JSON in and out, one ONNX Runtime call a batch.

It is copied into the .mar and runs in TorchServe's worker, so it imports only the standard library, numpy and
onnxruntime, and defines exactly one class (TorchServe instantiates the only class a handler module defines).

Request:  {"inputs": [{"name": "input", "shape": [n, C, H, W], "datatype": "FP32", "data": [... n*C*H*W ...]}]}
Response: {"model_name": ..., "outputs": [{"name": "logits", "shape": [n, K], "datatype": "FP32", "data": [...]}]}
A malformed request gets a 400 with {"error": "..."}; the other requests of its batch are answered normally.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort

INPUT, OUTPUT = "input", "logits"
# Overrides the archive's `handler.intra_op_threads` (model-config.yaml) for every model of a server.
THREADS_ENV = "DEPLOYKIT_ORT_THREADS"


class OnnxClassifierHandler:
    def initialize(self, context: Any) -> None:
        model_file = os.path.join(context.system_properties["model_dir"], context.manifest["model"]["serializedFile"])
        handler_config = (context.model_yaml_config or {}).get("handler") or {}
        threads = os.environ.get(THREADS_ENV) or handler_config.get("intra_op_threads")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        # The cores are shared with the frontend and other workers: idle threads sleep instead of spinning.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])
        # Fixed sizes of one sample (C, H, W); a symbolic dimension (a str or None) accepts any size.
        self.sample_dims = [d if isinstance(d, int) else None for d in self.session.get_inputs()[0].shape[1:]]
        self.model_name = context.model_name

    def handle(self, data: list[dict], context: Any) -> list[str]:
        responses: list[str] = [""] * len(data)
        # Requests grouped by sample shape (one group for a model with fixed C, H, W): one session call a group.
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for i, request in enumerate(data):
            context.set_response_content_type(i, "application/json")
            try:
                x = self._parse(request)
            except ValueError as exc:
                context.set_response_status(400, "Bad Request", idx=i)
                responses[i] = json.dumps({"error": str(exc)})
                continue
            groups.setdefault(x.shape[1:], []).append((i, x))
        for members in groups.values():
            logits = self.session.run([OUTPUT], {INPUT: np.concatenate([x for _, x in members])})[0]
            start = 0
            for i, x in members:
                part = logits[start : start + len(x)]
                start += len(x)
                output = {"name": OUTPUT, "shape": list(part.shape), "datatype": "FP32", "data": part.ravel().tolist()}
                responses[i] = json.dumps({"model_name": self.model_name, "outputs": [output]})
        return responses

    def _parse(self, request: dict) -> np.ndarray:
        """The request's input tensor, or ValueError with a message the client can act on."""
        body = request.get("body", request.get("data"))
        if body is None:  # TorchServe split a form-encoded POST (curl's and urllib's default) into fields
            raise ValueError("The request has no raw body: POST the JSON with Content-Type: application/json.")
        if isinstance(body, (bytes, bytearray, str)):  # TorchServe forwards the raw bytes when JSON decoding fails
            try:
                body = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"The request body is not valid JSON ({exc}).") from None
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if not isinstance(inputs, list):
            # ValueError marks every client mistake: handle() turns exactly those into a 400.
            raise ValueError('The request body must be a JSON object with an "inputs" list (Open Inference Protocol).')  # noqa: TRY004
        tensor = next((t for t in inputs if isinstance(t, dict) and t.get("name") == INPUT), None)
        if tensor is None:
            raise ValueError(f'The request has no input named "{INPUT}".')
        if tensor.get("datatype") != "FP32":
            raise ValueError(f'Input "{INPUT}" has datatype {tensor.get("datatype")!r}; send "FP32".')
        shape = tensor.get("shape")
        expected = ["n", *(d if d is not None else "any" for d in self.sample_dims)]
        if (
            not isinstance(shape, list)
            or len(shape) != len(expected)
            or not all(isinstance(d, int) and d >= 1 for d in shape)
            or any(want is not None and got != want for got, want in zip(shape[1:], self.sample_dims))
        ):
            raise ValueError(f'Input "{INPUT}" has shape {shape!r}; this model takes {expected} with n >= 1.')
        try:
            x = np.asarray(tensor.get("data"), dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f'Input "{INPUT}" data must be a list of numbers.') from None
        if x.size != int(np.prod(shape)):
            raise ValueError(f'Input "{INPUT}" has {x.size} values but shape {shape} needs {int(np.prod(shape))}.')
        return x.reshape(shape)
