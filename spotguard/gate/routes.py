"""Which requests the gate forwards: the inference API and health by default, every other path 403.

Engines serve admin endpoints on the same port as the API: llama.cpp ``/slots/<n>?action=restore|erase``
(replace or wipe another user's KV state), vLLM ``/pause``, ``/sleep``, ``/reset_prefix_cache``, SGLang
``/flush_cache``, ``/abort_request``, and more. Any client of the inference API could call them through
a proxy that forwards everything; the gate forwards only what an inference client needs, plus what
``[gate] allow_paths`` opens (parsed by ``config.parse_allow``).

Matching is on the path as the engine will see it: percent-escapes decoded (``/%73lots/0`` is
``/slots/0`` to llama.cpp), then ``.``, ``..`` and empty segments resolved. A path that still holds an
escape after one decoding (double encoding), a backslash, a control character or bytes that are not
UTF-8 is refused: engines disagree on what those mean. An allowed request is forwarded with the
normalised path, so the engine acts on exactly what was checked.

``check`` is pure and cheap: the usual exact paths are one dictionary lookup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from spotguard.config import parse_allow

_POST = frozenset({"POST"})
_READ = frozenset({"GET", "HEAD"})

DEFAULT_ROUTES: tuple[tuple[frozenset[str], str], ...] = (
    (_POST, "/v1/chat/completions"),
    (_POST, "/v1/completions"),
    (_POST, "/v1/embeddings"),
    (_POST, "/v1/responses"),
    (_READ, "/v1/models"),
    (_READ, "/v1/models/*"),
    (_READ, "/health"),
    (_READ, "/v1/health"),
)
"""The OpenAI inference paths (responses where the engine has them: others answer 404) and health."""

_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")
_FORWARD_SAFE = "/:@!$&'()*+,;=-._~"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    path: str
    """The decoded, normalised path (what was matched); the original when refused before decoding."""
    raw_path: bytes
    """What to send upstream: the request's own bytes when they were already normal, else ``path`` encoded."""
    reason: str = ""


@dataclass(frozen=True)
class _Rule:
    methods: frozenset[str]
    path: str
    prefix: bool

    def matches(self, method: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        return path.startswith(self.path + "/") if self.prefix else path == self.path


def _rules(routes: tuple[tuple[frozenset[str], str], ...]) -> tuple[_Rule, ...]:
    return tuple(_Rule(methods, pattern[:-2], True) if pattern.endswith("/*") else _Rule(methods, pattern, False)
                 for methods, pattern in routes)


def _normalise(raw_path: bytes) -> tuple[str, str]:
    """(decoded normalised path, "") or ("", why it is refused)."""
    decoded = unquote_to_bytes(raw_path)
    if _ESCAPE.search(decoded):
        return "", "the path is percent-encoded twice"
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        return "", "the path is not UTF-8"
    if "\\" in text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return "", "the path holds a backslash or a control character"
    if not text.startswith("/"):
        return "", "the path is not absolute"
    segments: list[str] = []
    for segment in text.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                return "", "the path climbs above the root"
            segments.pop()
        else:
            segments.append(segment)
    return "/" + "/".join(segments), ""


class Routes:
    """The gate's path policy: the defaults plus ``[gate] allow_paths``."""

    def __init__(self, allow_paths: tuple[str, ...] = ()) -> None:
        self._rules = _rules(DEFAULT_ROUTES + parse_allow(allow_paths))
        # Exact allowed paths per method, already normal: the common request costs one lookup.
        self._fast: dict[tuple[str, bytes], Verdict] = {}
        for rule in self._rules:
            if not rule.prefix:
                for method in rule.methods or ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
                    raw = rule.path.encode()
                    self._fast[(method, raw)] = Verdict(True, rule.path, raw)

    def check(self, method: str, raw_path: bytes) -> Verdict:
        """Allowed (with the path to forward) or refused (with why), for a request's method and raw path."""
        fast = self._fast.get((method, raw_path))
        if fast is not None:
            return fast
        path, why = _normalise(raw_path)
        if why:
            return Verdict(False, raw_path.decode("latin-1"), raw_path, f"forbidden by the gate: {why}")
        if not any(rule.matches(method, path) for rule in self._rules):
            return Verdict(False, path, raw_path, f"forbidden by the gate: {method} {quote(path, safe=_FORWARD_SAFE)} "
                                                  f"is not part of the inference API ([gate] allow_paths opens more)")
        forward = quote(path, safe=_FORWARD_SAFE).encode()
        return Verdict(True, path, raw_path if forward == raw_path else forward)


def check(method: str, raw_path: bytes, allow_paths: tuple[str, ...] = ()) -> Verdict:
    """One-off form of ``Routes(allow_paths).check``."""
    return Routes(allow_paths).check(method, raw_path)
