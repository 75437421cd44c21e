"""Reading engine gauges from Prometheus text: sums over label sets, garbage is a clear error."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotguard.errors import EngineError
from spotguard.servers.prom import metrics_url, sum_samples, total

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="a"} 2.0
vllm:num_requests_running{engine="1",model_name="a"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="a"} 4.0
# TYPE vllm:request_success counter
vllm:request_success_total{finished_reason="stop",model_name="a"} 10.0
"""
NAMES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def test_sums_over_label_sets() -> None:
    assert sum_samples(VLLM, NAMES, source="t") == {"vllm:num_requests_running": 3.0,
                                                    "vllm:num_requests_waiting": 4.0}
    assert total(VLLM, NAMES, prefix="vllm:", source="t") == 7
    assert sum_samples(VLLM, ["vllm:request_success_total"], source="t") == {"vllm:request_success_total": 10.0}


def test_missing_gauges() -> None:
    assert total("vllm:num_requests_running 2\n", NAMES, prefix="vllm:", source="t") == 2
    assert total("vllm:kv_cache_usage_perc 0.5\n", NAMES, prefix="vllm:", source="t") == 0
    with pytest.raises(EngineError, match="t: none of vllm:num_requests_running, vllm:num_requests_waiting found"):
        total("# vllm:num_requests_running 3\nnode_load1 0.5\n", NAMES, prefix="vllm:", source="t")
    with pytest.raises(EngineError, match="none of"):
        total("", NAMES, prefix="vllm:", source="t")


@pytest.mark.parametrize("text", ["vllm:num_requests_running{ 3\n", "vllm:num_requests_running three\n",
                                  "\x00\x01\x02", '{"running": 3}'])
def test_garbage(text: str) -> None:
    with pytest.raises(EngineError, match="t: not Prometheus text"):
        total(text, NAMES, prefix="vllm:", source="t")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_never_crashes(text: str) -> None:
    try:
        assert total(text, NAMES, prefix="vllm:", source="t") >= 0
    except EngineError:
        pass


def test_metrics_url() -> None:
    assert metrics_url("http://127.0.0.1:8000/", "") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("http://127.0.0.1:8000", "http://127.0.0.1:9000/m") == "http://127.0.0.1:9000/m"
    assert metrics_url("", "") == ""
