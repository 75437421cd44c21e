"""What resume names things by, and how a name read back is checked: answer ids, request fingerprints and
holder URLs. Shared by the gate, which makes them (``gate/cursor.py``), the configuration (``[resume]
advertise``) and the store, which reads them back from the fleet's index as hostile input
(``storage/answer_index.py``)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

MAX_HOLDER = 200
ANSWER_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
"""What an answer id looks like (``cursor.new_answer_id`` makes 16 of these characters)."""
FINGERPRINT = re.compile(r"[0-9a-f]{32}")
"""What ``cursor.request_fingerprint`` returns."""


def holder_problem(url: str) -> str:
    """Why ``url`` cannot name a holder (an ``http(s)://host[:port]`` base URL); empty when it can."""
    if not url or len(url) > MAX_HOLDER or not url.isascii() or not url.isprintable() or " " in url:
        return f"is not a printable ASCII URL of at most {MAX_HOLDER} characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return "is not a URL with a valid port"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be http(s)://host[:port]"
    if parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
        return "must be a base URL: no credentials, path, query or fragment"
    return ""
