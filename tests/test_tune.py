"""`deploykit tune`: the candidate grid, the choice rule, and a real short search whose config Triton loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from servers import NAME, SAMPLE, export_tiny, portable_options, start_triton

from deploykit.errors import DeploykitError
from deploykit.serve.oip import OipClient
from deploykit.serve.tune import best_row, candidates, tune_triton


def test_candidates_start_with_the_base_share_the_cores_and_never_narrow_the_batch():
    base = portable_options()  # max batch 8, dynamic batching on
    found = candidates(base, cores=2, concurrency=16)
    assert found[0] == base and len(found) == len({o.model_dump_json() for o in found})
    for o in found[1:]:
        assert o.threads in (2 // o.instances, 1) and o.max_batch_size in (8, 16)
        assert o.dynamic_batching or (o.max_queue_delay_us == 0 and o.preferred_batch_sizes == [])
    # waiting for the batch each instance can expect: 16 clients fill 8 (max batch 8) or 16 on one, 8 on each of two
    waiting = {(o.instances, o.max_batch_size, *o.preferred_batch_sizes) for o in found if o.preferred_batch_sizes}
    assert waiting == {(1, 8, 8), (1, 16, 16), (2, 8, 8), (2, 16, 8)}
    assert all(o.max_queue_delay_us == 500 for o in found if o.preferred_batch_sizes)
    assert {(o.instances, o.threads, o.max_batch_size, o.dynamic_batching) for o in found[1:]} == {
        (i, t, b, d) for i, t in ((1, 2), (1, 1), (2, 1)) for b in (8, 16) for d in (False, True)
    }
    unbatched = candidates(base.model_copy(update={"max_batch_size": 0}), cores=2, concurrency=16)
    assert {o.max_batch_size for o in unbatched} == {0} and {o.instances for o in unbatched} == {1, 2}


def test_a_batch_the_clients_cannot_fill_is_not_tried_and_instances_go_up_to_the_cores():
    base = portable_options()
    assert {o.max_batch_size for o in candidates(base, cores=2, concurrency=8)} == {8}  # 8 clients never fill 16
    wide = candidates(base, cores=16, concurrency=8)
    assert {o.instances for o in wide} == {1, 2, 4, 8, 16}
    assert all(o.threads in (16 // o.instances, 1) for o in wide[1:])


def test_the_most_throughput_within_the_slo_wins_else_the_lowest_p95():
    rows = [
        {"p95_ms": 2.0, "throughput_rps": 100.0},
        {"p95_ms": 4.0, "throughput_rps": 300.0},
        {"p95_ms": 9.0, "throughput_rps": 900.0},  # the fastest, but over the SLO
        {"p95_ms": None, "throughput_rps": None, "error": "Triton could not load it"},
    ]
    assert best_row(rows, max_p95_ms=5.0) == (1, True)
    assert best_row(rows, max_p95_ms=1.0) == (0, False)
    with pytest.raises(DeploykitError, match=r"No tuning candidate could be measured \(the first: Triton could not"):
        best_row(rows[3:], max_p95_ms=5.0)


@pytest.mark.side  # ~25 s: `make test` runs it in the second process
def test_a_short_real_search_writes_a_config_triton_loads(tmp_path):
    onnx = export_tiny(tmp_path / "tiny.onnx")
    samples = tmp_path / "samples.npy"
    np.save(samples, np.random.default_rng(0).standard_normal((8, *SAMPLE)).astype(np.float32))
    out = tmp_path / "tune"
    result = tune_triton(
        onnx, NAME, out, base=portable_options(), max_p95_ms=1000.0, concurrency=4, samples=samples,
        budget_s=10.0, window_ms=500,
    )  # fmt: skip
    saved = json.loads((out / "tune.json").read_text())
    assert saved["best"] == result["best"] and len(saved["tried"]) >= 2  # the base, then at least one more
    assert saved["meets_slo"] and saved["throughput_vs_base"] > 0
    if saved["best"]:  # a pick other than the base is measured again beside the base; the ratio pools both
        again = saved["confirmed"]
        assert again["base"]["throughput_rps"] > 0 and again["best"]["throughput_rps"] > 0
        pick, first = saved["tried"][saved["best"]], saved["tried"][0]
        pooled = (pick["throughput_rps"] + again["best"]["throughput_rps"]) / (
            first["throughput_rps"] + again["base"]["throughput_rps"]
        )
        assert saved["throughput_vs_base"] == pytest.approx(pooled)
    else:
        assert saved["confirmed"] == {} and saved["throughput_vs_base"] == 1.0
    for row in saved["tried"]:
        assert row["error"] is None and 0 < row["p50_ms"] <= row["p95_ms"] and row["throughput_rps"] > 0
    best = saved["tried"][saved["best"]]
    config = (out / "config.pbtxt").read_text()
    assert f"max_batch_size: {best['max_batch_size']}" in config and f"count: {best['instances']}" in config
    server = start_triton(out / "model_repo", log_path=tmp_path / "check.log")  # a fresh Triton loads what was kept
    try:
        assert server.failed_models() == {}
        x = np.load(samples)[:2]
        assert OipClient(server.infer_url, NAME).infer(x).shape == (2, 5)
    finally:
        server.stop()
