"""Will an answer finish here before the drain deadline? Worked out from its own pace so far.

At a drain the gate keeps an answer on the local engine only when it will be complete in time: it then
pays no seam. Every other one is handed to a peer at once, while the most time is left to finish it
there. The estimate: the tokens left (the request's own limit less what was delivered) at the slower of
the answer's pace since its first token and its pace since the last check (decoding slows as the context
grows, so the recent pace is the better guess once there is one). What cannot be told - no token limit,
no token yet, too few to judge a pace - counts as "will not finish": a needless hand-over costs one
re-prefill, a wrong stay costs the answer.
"""

from __future__ import annotations

from typing import Any

MIN_TOKENS = 4
"""Tokens seen before a pace is trusted (the first ones come with the prefill's delay)."""
HEADROOM = 0.8
"""Share of the time left an answer may need and still be kept: paces drift as the batch changes."""
LIMIT_KEYS = ("max_completion_tokens", "max_tokens", "n_predict")


def token_limit(body: dict[str, Any]) -> int | None:
    """The most tokens the request may produce, when it says."""
    limits = [body.get(key) for key in LIMIT_KEYS]
    found = [v for v in limits if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
    return min(found) if found else None


def pace(*, delivered: int, elapsed: float, recent: tuple[int, float] | None = None) -> float | None:
    """Tokens per second: ``delivered`` in ``elapsed`` seconds since the first, or the ``recent`` (tokens,
    seconds) since the last look when that is slower; None when there is too little to tell."""
    if delivered < MIN_TOKENS or elapsed <= 0:
        return None
    overall = delivered / elapsed
    if recent is not None and recent[1] > 0:
        return min(overall, recent[0] / recent[1])
    return overall


def finishes_within(*, limit: int | None, delivered: int, rate: float | None, seconds: float) -> bool:
    """An answer that has delivered ``delivered`` tokens, at ``rate`` tokens per second, will be complete
    within ``seconds``."""
    if limit is None:
        return False
    left = limit - delivered
    if left <= 0:
        return True
    if rate is None or rate <= 0:
        return False
    return left / rate <= seconds * HEADROOM
