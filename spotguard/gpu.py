"""GPU facts from NVML (nvidia-ml-py, module ``pynvml``): how many GPUs, and their memory.

These facts are context for operators (is the engine still holding GPU memory while we drain?),
never a reason to act, so every failure becomes a value (``GpuReport.error``) instead of an
exception. NVML calls are blocking C calls: async code goes through :class:`GpuMonitor`, which runs
them in a worker thread under a deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import pynvml
import structlog

if TYPE_CHECKING:
    from spotguard.metrics import Metrics

UNAVAILABLE = "nvml unavailable"


@dataclass(frozen=True, kw_only=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_used: int
    """Bytes."""
    memory_total: int
    """Bytes."""


@dataclass(frozen=True, kw_only=True)
class GpuReport:
    """One read of NVML. ``ok`` False means nothing could be read; ``error`` says why."""

    ok: bool
    driver: str = ""
    gpus: tuple[GpuInfo, ...] = ()
    error: str = ""

    @property
    def count(self) -> int:
        return len(self.gpus)


def _text(value: str | bytes) -> str:
    # Depending on the nvidia-ml-py version some getters return bytes, others str.
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _describe(exc: pynvml.NVMLError) -> str:
    if isinstance(exc, (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded)):
        # The normal state of a CPU-only machine: one stable message, so logs can de-duplicate.
        return f"{UNAVAILABLE}: {exc}"
    return f"nvml error: {exc}"


def read_gpus() -> GpuReport:
    """Reads every GPU's name, uuid and memory. Blocking; never raises for NVML failures."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GpuReport(ok=False, error=_describe(exc))
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GpuInfo(index=index, name=_text(pynvml.nvmlDeviceGetName(handle)),
                                uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                                memory_used=int(memory.used), memory_total=int(memory.total)))
        return GpuReport(ok=True, driver=driver, gpus=tuple(gpus))
    except pynvml.NVMLError as exc:
        # A GPU that fell off the bus (GPU_IS_LOST) fails the whole read: a partial list would
        # look like a smaller healthy machine.
        return GpuReport(ok=False, error=_describe(exc))
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass  # nothing useful to do; the next read initialises again


def record(metrics: Metrics, report: GpuReport) -> None:
    """Puts one report into the gauges; a failed read keeps no stale per-GPU series."""
    metrics.nvml_up.set(1 if report.ok else 0)
    metrics.gpu_count.set(report.count)
    # Clearing first drops series of GPUs that disappeared (or all of them when NVML failed).
    metrics.gpu_memory_used.clear()
    metrics.gpu_memory_total.clear()
    for gpu in report.gpus:
        labels = {"gpu": str(gpu.index), "uuid": gpu.uuid}
        metrics.gpu_memory_used.labels(**labels).set(gpu.memory_used)
        metrics.gpu_memory_total.labels(**labels).set(gpu.memory_total)


class GpuMonitor:
    """Samples NVML from async code; logs only when the outcome changes (not on every read)."""

    def __init__(self, metrics: Metrics, *, timeout: float = 5.0,
                 log: structlog.stdlib.BoundLogger | None = None) -> None:
        self._metrics = metrics
        self._timeout = timeout
        self._log = log if log is not None else structlog.stdlib.get_logger("spotguard.gpu")
        self._last_error: str | None = None

    async def sample(self) -> GpuReport:
        """One read in a worker thread, bounded by ``timeout``; recorded into the metrics."""
        try:
            with anyio.fail_after(self._timeout):
                # The C call cannot be interrupted; abandoning the thread on timeout keeps the
                # daemon responsive while a wedged driver finishes (or not) on its own.
                report = await anyio.to_thread.run_sync(read_gpus, abandon_on_cancel=True)
        except TimeoutError:
            report = GpuReport(ok=False, error=f"nvml did not answer within {self._timeout:g} s")
        record(self._metrics, report)
        if report.error != (self._last_error or "") or self._last_error is None:
            if report.ok:
                self._log.info("gpu facts", count=report.count, driver=report.driver,
                               gpus=[gpu.name for gpu in report.gpus])
            else:
                self._log.warning("gpu facts unavailable", error=report.error)
                self._metrics.config_errors.labels(component="gpu", reason="nvml").inc()
            self._last_error = report.error
        return report

    async def run(self, interval: float = 15.0) -> None:
        """Samples every ``interval`` seconds until cancelled."""
        while True:
            await self.sample()
            await anyio.sleep(interval)
