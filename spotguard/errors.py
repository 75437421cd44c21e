"""The one error tree of spotguard.

    SpotguardError
    ├── ConfigError            a setting is missing or wrong (names the key to change)
    ├── MetadataError          a cloud metadata endpoint misbehaved
    │   ├── MetadataUnavailable    transport error, timeout, 429/5xx: retry later
    │   └── MalformedMetadata      an answer we cannot parse: never faked into a notice
    ├── EngineError            the inference server did not do what was asked
    │   └── ManualActionRequired   spotguard cannot do it (restart a pid/command engine): a person must
    ├── StoreError             object storage failed
    ├── LoadBalancerError      a load-balancer API refused or failed
    ├── ControlError           the control socket could not be reached or refused the call
    ├── GateError              the gate process could not be reached or refused a call
    └── ResumeRefused          a resume cursor or index object cannot be used (``reason`` says why)

Third-party errors are wrapped at the boundary (``raise MetadataError(...) from exc``).
"""

from __future__ import annotations


class SpotguardError(Exception):
    """Base of every error spotguard raises on purpose."""


class ConfigError(SpotguardError):
    """A configuration value is wrong; the message names the key."""


class MetadataError(SpotguardError):
    """A metadata endpoint failed; ``reason`` is a short label used in metrics."""

    def __init__(self, message: str, *, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class MetadataUnavailable(MetadataError):
    """Transport failure, timeout or a retryable status (429, 5xx)."""


class MalformedMetadata(MetadataError):
    """The endpoint answered, but with something we cannot parse."""

    def __init__(self, message: str, *, reason: str = "malformed") -> None:
        super().__init__(message, reason=reason)


class EngineError(SpotguardError):
    """The inference server adapter could not complete an action."""


class ManualActionRequired(EngineError):
    """spotguard cannot undo what it did (start an engine it only signalled); the message says what to do by hand."""


class StoreError(SpotguardError):
    """Object storage failed or is unreachable."""


class LoadBalancerError(SpotguardError):
    """A load-balancer API call failed; the message says what to fix."""


class ControlError(SpotguardError):
    """The control socket is missing, not permitted, or refused the request."""


class GateError(SpotguardError):
    """The gate process (``spotguard gate``) is not running, not reachable, or refused a call."""


class ResumeRefused(SpotguardError):
    """A request to resume an answer cannot be served from what it carries: a cursor altered, signed with
    another key, or made for another request or Authorization, expired, or an offset past the answer.
    ``reason`` is a short label for metrics; the message never holds the cursor itself."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or f"resume refused: {reason}")
        self.reason = reason
