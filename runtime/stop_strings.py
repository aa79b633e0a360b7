"""Stop strings for streamed text: the output ends just before the first stop string, and text
that could still turn out to be the start of one is held back, so a client never sees part of a
stop string that later completes (or loses text that does not)."""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.stopped = False  # a stop string was produced: the generation should end
        self._held = ""

    def push(self, text: str) -> str:
        """Add newly generated text; return what is safe to show now."""
        if self.stopped:
            return ""
        buf = self._held + text
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return buf[: min(found)]
        keep = self._open_prefix(buf)
        self._held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The generation ended without a stop string: release what was held back."""
        out, self._held = self._held, ""
        return "" if self.stopped else out

    def _open_prefix(self, buf: str) -> int:
        """Length of the longest end of ``buf`` that begins some stop string (and is shorter)."""
        longest = max((len(s) for s in self.stops), default=1) - 1
        for k in range(min(len(buf), longest), 0, -1):
            tail = buf[len(buf) - k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
