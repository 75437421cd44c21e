"""Request lengths (and, for a replay, arrival times) the fleet serves.

Formats read from a path the user gives:

- the Azure LLM inference trace (``Azure/AzurePublicDataset``, ``AzureLLMInferenceTrace_{conv,code}.csv``):
  ``TIMESTAMP,ContextTokens,GeneratedTokens``;
- JSON lines, one request each: ``{"at": seconds, "input_tokens": n, "output_tokens": n, "stream": bool}``
  (``at`` and ``stream`` optional).

Neither says whether a client streamed; ``stream_share`` decides that, the same way for every run of a seed.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.sim.errors import SimInputError


@dataclass(frozen=True)
class Request:
    """One request: when it was sent (seconds; relative to the notice in a replay), its lengths, streaming."""

    sent_s: float
    input_tokens: int
    output_tokens: int
    stream: bool


@dataclass(frozen=True)
class Workload:
    source: str
    requests: tuple[Request, ...]

    def scaled(self, output_scale: float) -> Workload:
        """The same requests with answers ``output_scale`` times as long (a what-if for longer answers)."""
        if output_scale <= 0:
            raise SimInputError(f"--output-scale must be positive, got {output_scale}")
        if output_scale == 1:
            return self
        return Workload(f"{self.source}, answers x{output_scale:g}",
                        tuple(Request(r.sent_s, r.input_tokens, max(1, round(r.output_tokens * output_scale)),
                                      r.stream) for r in self.requests))

    def mean_service_s(self, tokens_per_s: float, prefill_tokens_per_s: float) -> float:
        """Mean seconds a request holds a slot: prefill of its input, then one token after another."""
        total = sum(r.input_tokens / prefill_tokens_per_s + r.output_tokens / tokens_per_s for r in self.requests)
        return total / len(self.requests)

    @property
    def stream_share(self) -> float:
        return sum(r.stream for r in self.requests) / len(self.requests)


def _positive_int(value: object, where: str) -> int:
    try:
        number = int(str(value))
    except ValueError as exc:
        raise SimInputError(f"{where}: {value!r} is not a whole number of tokens") from exc
    if number < 0:
        raise SimInputError(f"{where}: a token count cannot be negative ({number})")
    return number


def load(path: Path, *, stream_share: float, rng: random.Random) -> Workload:
    """Requests from an Azure LLM trace CSV or a JSON-lines file; at least one request with output."""
    if not 0.0 <= stream_share <= 1.0:
        raise SimInputError(f"--stream-share must be in [0, 1], got {stream_share}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SimInputError(f"{path}: cannot read the workload: {exc}") from exc
    requests: list[Request] = []
    first = text.lstrip()[:1]
    if first == "{":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SimInputError(f"{path}:{number}: not JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise SimInputError(f"{path}:{number}: expected an object with input_tokens and output_tokens")
            stream = row.get("stream")
            requests.append(Request(float(row.get("at", 0.0)),
                                    _positive_int(row.get("input_tokens"), f"{path}:{number} input_tokens"),
                                    _positive_int(row.get("output_tokens"), f"{path}:{number} output_tokens"),
                                    bool(stream) if stream is not None else rng.random() < stream_share))
    else:
        reader = csv.DictReader(text.splitlines())
        wanted = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not reader.fieldnames or not wanted <= set(reader.fieldnames):
            raise SimInputError(f"{path}: expected JSON lines or a CSV with the columns {', '.join(sorted(wanted))} "
                                "(the Azure LLM inference trace)")
        origin: datetime | None = None
        for number, row in enumerate(reader, 2):
            try:
                at = datetime.fromisoformat(row["TIMESTAMP"].strip()[:26])
            except ValueError as exc:
                raise SimInputError(f"{path}:{number}: TIMESTAMP {row['TIMESTAMP']!r} is not a date and time") from exc
            origin = origin or at
            requests.append(Request((at - origin).total_seconds(),
                                    _positive_int(row["ContextTokens"], f"{path}:{number} ContextTokens"),
                                    _positive_int(row["GeneratedTokens"], f"{path}:{number} GeneratedTokens"),
                                    rng.random() < stream_share))
    requests = [r for r in requests if r.output_tokens > 0]
    if not requests:
        raise SimInputError(f"{path}: no request with output tokens")
    return Workload(path.name, tuple(requests))


AZURE_CONV_MEANS = (1155, 211)
"""Mean context and generated tokens of the Azure LLM inference trace 2023, conversation
(AzureLLMInferenceTrace_conv.csv, 19,366 requests): the default workload's means when none is given."""


def exponential(*, mean_input: float, mean_output: float, n: int, stream_share: float,
                rng: random.Random) -> Workload:
    """``n`` requests with exponentially distributed lengths (at least one output token)."""
    requests = tuple(Request(0.0, int(rng.expovariate(1 / mean_input)), max(1, int(rng.expovariate(1 / mean_output))),
                             rng.random() < stream_share) for _ in range(n))
    return Workload(f"exponential lengths, means {mean_input:g} in / {mean_output:g} out", requests)
