"""Incremental detokenization and stopping rules for one generated sequence. Pure python.

Text is re-decoded from all generated ids each step (correct across multi-byte and merged
tokens); an incomplete UTF-8 tail (U+FFFD) is held back, and so is any tail that could still
turn into a stop string, so a streamed client never sees text that is later retracted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass
class StopState:
    decode: Callable[[Sequence[int]], str]
    stop: tuple[str, ...] = ()
    eos_ids: frozenset[int] = frozenset()
    max_new_tokens: int = 64
    max_total_tokens: int | None = None  # context window
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # final text so far (stop string cut off)
    emitted: int = 0  # characters of ``text`` already handed to the client
    finish_reason: str | None = None

    def append(self, token_id: int) -> str:
        """Add one token; return the newly releasable text (may be empty)."""
        if self.finish_reason is not None:
            raise RuntimeError("sequence already finished")
        if token_id in self.eos_ids:
            self.finish_reason = "eos"
            return self._flush()
        self.token_ids.append(token_id)
        full = self.decode(self.token_ids)
        if self.stop:
            search_from = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [(full.find(s, search_from), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                cut = min(i for i, _ in hits)
                self.text = full[:cut]
                self.finish_reason = "stop"
                return self._flush()
        self.text = full
        if len(self.token_ids) >= self.max_new_tokens or (
            self.max_total_tokens is not None
            and self.prompt_tokens + len(self.token_ids) >= self.max_total_tokens
        ):
            self.finish_reason = "length"
            return self._flush()
        return self._release()

    def _safe_length(self) -> int:
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe = len(self.text.rstrip("\ufffd"))
        for s in self.stop:
            # Hold back the longest tail that is a proper prefix of a stop string.
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return max(safe, self.emitted)

    def _release(self) -> str:
        safe = self._safe_length()
        delta = self.text[self.emitted:safe]
        self.emitted = safe
        return delta

    def _flush(self) -> str:
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
