# Production image: Triton Inference Server serving the native model repository that
# `deploykit package --flavour native` writes to model_repo/ (onnxruntime_onnx / tensorrt_plan backends).
#
#   deploykit package --flavour native ...   # fills model_repo/
#   docker build -t deploykit-triton .
#   docker run --rm -p 8000-8002:8000-8002 --shm-size=1g deploykit-triton
#
# 24.10 is Triton 2.51, the same server version as the binary deploykit tests against.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

WORKDIR /opt/deploykit

# torch pinned and first: an unpinned torch requirement pulls several GB of extra CUDA wheels.
RUN python3 -m pip install --no-cache-dir torch==2.13.0

# Sources before the model repository, so a new model does not reinstall the package.
COPY pyproject.toml README.md ./
COPY deploykit ./deploykit
# onnxruntime (a core dependency) and onnxruntime-gpu install the same module and overwrite each other:
# keep only the GPU build.
RUN python3 -m pip install --no-cache-dir ".[gpu]" \
 && python3 -m pip uninstall -y onnxruntime onnxruntime-gpu \
 && python3 -m pip install --no-cache-dir onnxruntime-gpu

COPY --chown=triton-server:triton-server model_repo/ /models/

# The base image ships this unprivileged user.
USER triton-server

EXPOSE 8000 8001 8002

# python3 is in the image (curl may not be); urlopen raises, so the check fails, unless /ready answers 200.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]

CMD ["tritonserver", "--model-repository=/models", "--exit-on-error=false"]
