"""TorchServe model store writer: a .mar per model (built by the real torch-model-archiver), its batch settings beside
it, and the config.properties a server is started with."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from deploykit.errors import DeploykitError
from deploykit.files import atomic_copy, atomic_write_json, atomic_write_text
from deploykit.package.names import validate_model_name

HANDLER_SOURCE = Path(__file__).with_name("torchserve_handler.py")
CONFIG_NAME = "config.properties"
# JSON carries ~10 bytes a float: a batch of 224x224 RGB images is far over TorchServe's 6.5 MB default.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# TorchServe's token authorization stays on; its keys expire after 60 minutes by default and only its /token API
# renews them, which nothing here calls: a server would lock its own clients out after an hour. The keys are new at
# each start, so they live as long as a server reasonably runs instead.
TOKEN_EXPIRATION_MIN = 365 * 24 * 60
# What the <name>.json beside each .mar holds (and write_config_properties' `models` values), with the defaults of
# write_torchserve_archive's parameters of the same names.
DEFAULT_SETTINGS: dict[str, Any] = {"version": "1.0", "batch_size": 8, "max_batch_delay_ms": 5, "workers": 1}


def write_torchserve_archive(
    model_file: Path,
    model_store: Path,
    name: str,
    *,
    version: str = "1.0",
    batch_size: int = 8,
    max_batch_delay_ms: int = 5,
    workers: int = 1,
    threads: int | None = None,
) -> Path:
    """Archive the ONNX `model_file` with the deploykit handler as <model_store>/<name>.mar; returns its path.

    The batch settings go to <model_store>/<name>.json so a server can be configured from the store alone; `threads`
    (ONNX Runtime intra-op threads a worker) goes inside the archive, in its model-config.yaml.
    """
    validate_model_name(name)
    model_file, model_store = Path(model_file), Path(model_store)
    if not model_file.is_file() or model_file.suffix != ".onnx":
        raise DeploykitError(
            f"The model file {model_file} is not an existing .onnx file: export the model to ONNX first."
        )
    for key, value, least in (
        ("batch_size", batch_size, 1),
        ("max_batch_delay_ms", max_batch_delay_ms, 0),
        ("workers", workers, 1),
        ("threads", 1 if threads is None else threads, 1),
    ):
        if not isinstance(value, int) or value < least:
            raise DeploykitError(f"TorchServe setting {key}={value!r} is invalid: use a whole number >= {least}.")
    if not version or any(c.isspace() for c in version):
        raise DeploykitError(f"TorchServe model version {version!r} is invalid: use a non-empty word such as '1.0'.")

    with tempfile.TemporaryDirectory(prefix="deploykit-mar-") as tmp:
        build = Path(tmp)
        # The handler's file name becomes its module name inside the archive.
        handler = shutil.copyfile(HANDLER_SOURCE, build / HANDLER_SOURCE.name)
        argv = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            name,
            "--version",
            version,
            "--serialized-file",
            str(model_file),
            "--handler",
            str(handler),
            "--export-path",
            str(build),
        ]
        if threads is not None:
            config = build / "model-config.yaml"
            config.write_text(yaml.safe_dump({"handler": {"intra_op_threads": threads}}))
            argv += ["--config-file", str(config)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        built = build / f"{name}.mar"
        if done.returncode != 0 or not built.is_file():
            reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DeploykitError(
                f"torch-model-archiver failed for {model_file} ({reason[0]}): check the serve extra is installed."
            )
        mar = atomic_copy(built, model_store / f"{name}.mar")
    settings = {
        "version": version,
        "batch_size": batch_size,
        "max_batch_delay_ms": max_batch_delay_ms,
        "workers": workers,
    }
    atomic_write_json(model_store / f"{name}.json", settings)
    return mar


def read_store_models(model_store: Path) -> dict[str, dict[str, Any]]:
    """Name -> settings of every .mar in `model_store`, from the <name>.json beside it or else the defaults."""
    models = {}
    for mar in sorted(Path(model_store).glob("*.mar")):
        sidecar = mar.with_suffix(".json")
        try:
            models[mar.stem] = {**DEFAULT_SETTINGS, **(json.loads(sidecar.read_text()) if sidecar.is_file() else {})}
        except (OSError, ValueError) as exc:
            raise DeploykitError(
                f"The settings file {sidecar} is unreadable ({exc}): package {mar.stem!r} again."
            ) from exc
    return models


def write_config_properties(
    model_store: Path,
    *,
    host: str = "127.0.0.1",
    inference_port: int = 8080,
    management_port: int = 8081,
    metrics_port: int = 8082,
    models: dict[str, dict] | None = None,
    grpc_inference_port: int = 7070,
    grpc_management_port: int = 7071,
) -> Path:
    """Write <model_store>/config.properties serving `models` (name -> settings with DEFAULT_SETTINGS' keys, missing
    ones defaulted; by default every .mar of the store with its <name>.json); returns its path.

    TorchServe always opens its gRPC APIs too (there is no switch to turn them off), on 7070/7071 unless told:
    a second server on the machine needs other gRPC ports or it stops right after starting.
    """
    model_store = Path(model_store)
    if not model_store.is_dir():
        raise DeploykitError(f"The TorchServe model store {model_store} does not exist: package a model into it first.")
    models = read_store_models(model_store) if models is None else models
    if not models:
        raise DeploykitError(f"The TorchServe model store {model_store} holds no .mar: package a model into it first.")
    per_model = {}
    for name, settings in models.items():
        validate_model_name(name)
        if not (model_store / f"{name}.mar").is_file():
            raise DeploykitError(f"The model store {model_store} has no {name}.mar: package {name!r} first.")
        unknown = set(settings) - set(DEFAULT_SETTINGS)
        if unknown:
            raise DeploykitError(
                f"Unknown TorchServe settings {sorted(unknown)} for {name!r}: use only {list(DEFAULT_SETTINGS)}."
            )
        model = {**DEFAULT_SETTINGS, **settings}
        per_model[name] = {
            str(model["version"]): {
                "defaultVersion": True,
                "marName": f"{name}.mar",
                "minWorkers": int(model["workers"]),
                "maxWorkers": int(model["workers"]),
                "batchSize": int(model["batch_size"]),
                "maxBatchDelay": int(model["max_batch_delay_ms"]),
            }
        }
    lines = {
        "inference_address": f"http://{host}:{inference_port}",
        "management_address": f"http://{host}:{management_port}",
        "metrics_address": f"http://{host}:{metrics_port}",
        "grpc_inference_address": host,
        "grpc_inference_port": str(grpc_inference_port),
        "grpc_management_address": host,
        "grpc_management_port": str(grpc_management_port),
        "metrics_mode": "prometheus",
        "model_store": str(model_store.resolve()),
        "load_models": ",".join(f"{name}.mar" for name in per_model),
        "models": json.dumps(per_model, sort_keys=True),
        # Workers come from `models`; this only keeps a model registered later from taking one per core.
        "default_workers_per_model": "1",
        "token_expiration_min": str(TOKEN_EXPIRATION_MIN),
        "max_request_size": str(MAX_MESSAGE_BYTES),
        "max_response_size": str(MAX_MESSAGE_BYTES),
    }
    path = model_store / CONFIG_NAME
    atomic_write_text(path, "".join(f"{key}={value}\n" for key, value in lines.items()))
    return path
