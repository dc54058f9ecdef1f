"""The bad-input corpus against a real Triton (portable flavour): what is refused, what the server's own parser
answers with 500, and the two requests that take Triton 2.51's HTTP frontend down."""

from __future__ import annotations

import numpy as np
import pytest
from servers import NAME, SAMPLE, export_tiny, portable_options, start_triton

from deploykit.package.triton_repo import write_triton_model
from deploykit.serve.oip import OipClient
from deploykit.validate.fuzz import fuzz_server

# Found by this corpus: each kills tritonserver 2.51 (the connection drops, the process exits) before any model
# code runs, so no model repository setting can guard against them. The test fails if the list changes.
TRITON_251_CRASHERS = ["http json: huge dim", "http json: deeply nested JSON"]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    onnx = export_tiny(tmp / "m.onnx")
    write_triton_model(tmp / "repo", NAME, onnx, portable_options())
    server = start_triton(tmp / "repo", log_path=tmp / "triton.log")
    x = np.random.default_rng(0).standard_normal((1, *SAMPLE)).astype(np.float32)
    client = OipClient(server.infer_url, NAME)
    reference = client.infer(x)

    def restart() -> None:  # same ports: the corpus goes on where it stopped
        server.stop()
        server.start()

    try:
        yield fuzz_server(
            server.infer_url, NAME, list(SAMPLE), grpc_url=server.grpc_url, restart=restart,
            good=lambda: bool(np.allclose(client.infer(x), reference, atol=1e-6)),
        )  # fmt: skip
    finally:
        server.stop()


def test_at_least_30_malformed_requests_per_protocol_and_no_unknown_crash(fuzzed):
    counts = fuzzed["counts"]
    assert counts["http json"]["sent"] >= 30 and counts["grpc"]["sent"] >= 30 and counts["http binary"]["sent"] >= 30
    assert fuzzed["crashed"] == TRITON_251_CRASHERS and fuzzed["not_sent"] == 0
    assert fuzzed["good_request_after"] is True  # correct outputs right after the corpus


def test_every_answer_is_a_refusal_or_the_servers_own_error_with_a_message(fuzzed):
    outcomes = {f"{o['protocol']}: {o['case']}": o for o in fuzzed["outcomes"]}
    for o in outcomes.values():
        if o["result"] == "server error":  # Triton's JSON parser answers 500, with the reason
            assert o["protocol"] != "grpc" and ("Unable to parse" in o["detail"] or "failed to parse" in o["detail"]), o
    accepted = sorted(k for k, o in outcomes.items() if o["result"] == "accepted")
    # gRPC's extra raw buffer is dropped by Triton before the model sees the request: nothing to refuse it with.
    assert accepted == ["grpc: more raw buffers than inputs"], accepted
    for key in ("http json: NaN data", "http binary: binary: NaN tensor", "grpc: NaN tensor", "grpc: Inf tensor"):
        assert outcomes[key]["result"] == "refused" and "finite" in outcomes[key]["detail"], outcomes[key]
    assert outcomes["http json: path-like model name"]["result"] == "refused"
    assert outcomes["grpc: unknown model"]["result"] == outcomes["grpc: path-like model name"]["result"] == "refused"


def test_cli_validate_fuzz_reports_the_crash_and_exits_nonzero(tmp_path):
    import json

    from typer.testing import CliRunner

    from deploykit.cli import app

    onnx = export_tiny(tmp_path / "m.onnx")
    write_triton_model(tmp_path / "repo", NAME, onnx, portable_options())
    server = start_triton(tmp_path / "repo", log_path=tmp_path / "triton.log")
    try:
        args = ["validate", "--url", server.infer_url, "--model", NAME, "--grpc-url", server.grpc_url,
                "--duration", "0", "--fuzz", "--out", str(tmp_path / "v")]  # fmt: skip
        result = CliRunner().invoke(app, args)
    finally:
        server.stop()
    assert result.exit_code == 1, result.output
    saved = json.loads((tmp_path / "v" / "validation.json").read_text())
    checks = {c["name"]: c for c in saved["checks"]}
    # validate does not own the server, so the corpus stops at the first request that kills it, and says so.
    assert saved["fuzz"]["crashed"] == TRITON_251_CRASHERS[:1] and saved["fuzz"]["not_sent"] > 0
    assert (
        checks["server survives the corpus"]["status"] == "fail"
        and "huge dim" in checks["server survives the corpus"]["detail"]
    )
    assert checks["correct right after the corpus"]["status"] == "fail"
