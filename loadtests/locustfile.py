"""deploykit's load-test users, to run with plain locust (what `deploykit loadtest` runs for you).

Against Triton over HTTP, with the web UI or headless:

    DEPLOYKIT_MODEL=resnet18 locust -f loadtests/locustfile.py --host http://127.0.0.1:8000
    DEPLOYKIT_MODEL=resnet18 locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \\
        --headless -u 8 -r 8 -t 30s

Over gRPC, or against TorchServe (which reports no input shape, so give it):

    DEPLOYKIT_PROTOCOL=grpc DEPLOYKIT_GRPC_URL=127.0.0.1:8001 DEPLOYKIT_MODEL=resnet18 \\
        locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 30s
    DEPLOYKIT_ENGINE=torchserve DEPLOYKIT_INPUT_SHAPE=3,224,224 DEPLOYKIT_MODEL=resnet18 \\
        locust -f loadtests/locustfile.py --host http://127.0.0.1:8080

Optional: DEPLOYKIT_SAMPLES_IN=inputs.npy (real (N, C, H, W) float32 inputs to cycle through) and
DEPLOYKIT_SAMPLES_OUT=timings.npy (every request's raw timing, written when locust exits).
The full list is in deploykit/loadtest/locustfile.py.
"""

from deploykit.loadtest.locustfile import *  # the users and their event listeners
