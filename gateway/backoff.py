"""The one retry delay of yigong-gateway: exponential backoff with a cap.

Every loop that tries again after a failure (the outbox's sends, the DICOM spool's
filer, the syslog sender, the ATNA forwarder) asks :class:`Backoff` how long to
wait before its next try, so "how fast do we retry" has one answer and one test.
The delay after the ``n``-th consecutive failure is ``initial * factor ** (n - 1)``,
at most ``maximum``; with ``jitter`` (a fraction, 0..1) a random part of it is taken
off, so that many nodes failing together do not retry in lock-step. Without jitter
the delays are exact; with it they come from ``rng`` (seed one for tests).

``tests/test_one_home.py`` fails when a retry loop computes its own ``2 **``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_MAX_EXPONENT = 1000
"""``factor ** n`` for larger ``n`` overflows a float; the cap is long reached by then."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``delay(n)`` is the wait after the ``n``-th failure in a row.

    >>> [Backoff(1.0, 5.0).delay(n) for n in (1, 2, 3, 4)]
    [1.0, 2.0, 4.0, 5.0]
    """

    initial: float
    """The first delay (after one failure), seconds; > 0."""
    maximum: float
    """No delay is longer, seconds; >= ``initial``."""
    factor: float = 2.0
    """Each further failure multiplies the delay by this; >= 1."""
    jitter: float = 0.0
    """Fraction of each delay that may be taken off at random (0: exact delays)."""
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)
    """Where jitter comes from (pass ``random.Random(seed)`` for reproducible delays)."""

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(
                f"backoff needs 0 < initial <= maximum, not {self.initial} and {self.maximum}"
            )
        if self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(
                f"backoff needs factor >= 1 and 0 <= jitter <= 1, not {self.factor}, {self.jitter}"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th consecutive failure (1 = the first)."""
        exponent = min(max(attempt, 1) - 1, _MAX_EXPONENT)
        delay = float(min(self.maximum, self.initial * self.factor**exponent))
        if self.jitter:
            delay -= delay * self.jitter * self.rng.random()
        return delay
