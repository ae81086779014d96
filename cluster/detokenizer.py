"""Incremental detokenization and stop-string matching on the text.

Decodes a sliding window of tokens (prefix/read offsets) so that each step costs
O(window), holds back text that ends in an incomplete UTF-8 sequence ("\ufffd"),
and keeps the word-boundary spacing that depends on the previous token.
"""
from __future__ import annotations

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop or []
        self.tokens: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""
        self.stopped_on: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add_tokens(self, token_ids: list[int]) -> str:
        """Append generated tokens; return the new text (empty while bytes are incomplete).

        After a stop string appears, `stopped_on` is set and the text is cut before it.
        """
        if self.tokenizer is None or self.stopped_on is not None:
            return ""
        self.tokens.extend(token_ids)
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return self._append_checking_stop(delta)

    def visible_text(self, finished: bool) -> str:
        """Text safe to show: while running, the last chars that could begin a stop
        string are held back, so streamed text never has to be taken back."""
        if finished or not self.stop:
            return self.text
        hold = max(len(s) for s in self.stop) - 1
        return self.text[:max(0, len(self.text) - hold)]

    def _append_checking_stop(self, delta: str) -> str:
        before = len(self.text)
        self.text += delta
        if self.stop:
            longest = max(len(s) for s in self.stop)
            search_from = max(0, before - longest + 1)
            hits = [(self.text.find(s, search_from), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                cut, self.stopped_on = min(hits)
                self.text = self.text[:cut]
                return self.text[before:] if cut > before else ""
        return delta
