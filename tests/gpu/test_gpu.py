"""NVML facts through the real pynvml binding, against a fake libnvidia-ml.so.1 and without any library."""

from __future__ import annotations

import ctypes.util

import anyio
import pytest
import structlog.testing

from spotguard import gpu
from spotguard.metrics import Metrics
from tests.support.fake_nvml import FakeNvml

# Runs in a fresh interpreter (see tests/support/fake_nvml.py): samples through the async monitor,
# then prints the report and the exported gauges as JSON.
SAMPLE = """
import dataclasses, json, anyio
from prometheus_client.parser import text_string_to_metric_families
from spotguard.gpu import GpuMonitor
from spotguard.metrics import Metrics

metrics = Metrics()
report = anyio.run(GpuMonitor(metrics, timeout=float(__import__("os").environ.get("TIMEOUT", "5"))).sample)
samples = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(metrics.render().decode())
           for s in f.samples if s.name.startswith(("spotguard_gpu", "spotguard_nvml"))]
print(json.dumps({"report": dataclasses.asdict(report), "samples": samples}))
"""


def gauge(samples: list[list[object]], name: str, **labels: str) -> float:
    found = [value for n, got, value in samples if n == name and got == labels]
    assert len(found) == 1, (name, labels, samples)
    return float(found[0])  # type: ignore[arg-type]


def test_reads_every_gpu_through_the_real_binding(fake_nvml: FakeNvml) -> None:
    out = fake_nvml.run_python(SAMPLE, {"FAKE_NVML_COUNT": "2", "FAKE_NVML_NAME": "NVIDIA L4",
                                        "FAKE_NVML_MEM_TOTAL": "24000000000", "FAKE_NVML_MEM_USED": "5000",
                                        "FAKE_NVML_DRIVER": "535.183.01"})
    report = out["report"]
    assert report["ok"] is True and report["error"] == "" and report["driver"] == "535.183.01"
    assert [(g["index"], g["name"], g["memory_used"], g["memory_total"]) for g in report["gpus"]] == [
        (0, "NVIDIA L4", 5000, 24000000000), (1, "NVIDIA L4", 5001, 24000000000)]
    uuid1 = report["gpus"][1]["uuid"]
    assert uuid1.startswith("GPU-") and uuid1 != report["gpus"][0]["uuid"]
    samples = out["samples"]
    assert gauge(samples, "spotguard_nvml_up") == 1
    assert gauge(samples, "spotguard_gpu_count") == 2
    assert gauge(samples, "spotguard_gpu_memory_used_bytes", gpu="1", uuid=uuid1) == 5001
    assert gauge(samples, "spotguard_gpu_memory_total_bytes", gpu="1", uuid=uuid1) == 24000000000


def test_zero_gpus_is_a_good_read(fake_nvml: FakeNvml) -> None:
    out = fake_nvml.run_python(SAMPLE, {"FAKE_NVML_COUNT": "0"})
    assert out["report"]["ok"] is True and out["report"]["gpus"] == []
    assert gauge(out["samples"], "spotguard_nvml_up") == 1
    assert gauge(out["samples"], "spotguard_gpu_count") == 0


def test_a_lost_gpu_fails_the_read_without_partial_series(fake_nvml: FakeNvml) -> None:
    out = fake_nvml.run_python(SAMPLE, {"FAKE_NVML_COUNT": "2", "FAKE_NVML_MEMORY_ERROR": "15"})
    assert out["report"]["ok"] is False
    assert out["report"]["error"] == "nvml error: GPU is lost"
    assert gauge(out["samples"], "spotguard_nvml_up") == 0
    assert not [s for s in out["samples"] if s[0].startswith("spotguard_gpu_memory")]


def test_driver_not_loaded_reads_as_unavailable(fake_nvml: FakeNvml) -> None:
    out = fake_nvml.run_python(SAMPLE, {"FAKE_NVML_INIT_ERROR": "9"})  # NVML_ERROR_DRIVER_NOT_LOADED
    assert out["report"]["error"].startswith(gpu.UNAVAILABLE)


def test_a_hanging_driver_is_abandoned_at_the_deadline(fake_nvml: FakeNvml) -> None:
    out = fake_nvml.run_python(SAMPLE, {"FAKE_NVML_INIT_DELAY_MS": "3000", "TIMEOUT": "0.3"})
    assert out["report"] == {"ok": False, "driver": "", "gpus": [], "error": "nvml did not answer within 0.3 s"}
    assert gauge(out["samples"], "spotguard_nvml_up") == 0


def test_no_library_in_a_subprocess(fake_nvml: FakeNvml) -> None:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this machine has a real libnvidia-ml; the no-GPU path cannot be shown here")
    out = fake_nvml.run_python(SAMPLE, with_library=False)
    assert out["report"] == {"ok": False, "driver": "", "gpus": [],
                             "error": "nvml unavailable: NVML Shared Library Not Found"}
    assert gauge(out["samples"], "spotguard_nvml_up") == 0
    assert gauge(out["samples"], "spotguard_gpu_count") == 0


@pytest.mark.anyio
async def test_no_gpu_logs_once_and_never_raises() -> None:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this machine has a real libnvidia-ml; the no-GPU path cannot be shown here")
    metrics = Metrics()
    monitor = gpu.GpuMonitor(metrics, timeout=5)
    with structlog.testing.capture_logs() as logs, anyio.fail_after(10):
        reports = [await monitor.sample() for _ in range(3)]
    assert all(not r.ok and r.error.startswith(gpu.UNAVAILABLE) for r in reports)
    assert [entry["event"] for entry in logs] == ["gpu facts unavailable"]
    assert metrics.registry.get_sample_value("spotguard_nvml_up") == 0
    assert metrics.registry.get_sample_value("spotguard_errors_total",
                                             {"component": "gpu", "reason": "nvml"}) == 1


def test_record_drops_series_of_gpus_that_went_away() -> None:
    metrics = Metrics()
    two = tuple(gpu.GpuInfo(index=i, name="x", uuid=f"GPU-{i}", memory_used=1, memory_total=2) for i in range(2))
    gpu.record(metrics, gpu.GpuReport(ok=True, gpus=two))
    gpu.record(metrics, gpu.GpuReport(ok=True, gpus=two[:1]))
    get = metrics.registry.get_sample_value
    assert get("spotguard_gpu_memory_total_bytes", {"gpu": "0", "uuid": "GPU-0"}) == 2
    assert get("spotguard_gpu_memory_total_bytes", {"gpu": "1", "uuid": "GPU-1"}) is None
    assert get("spotguard_gpu_count") == 1
