"""Incremental detokenization and stop-string matching on the text.

Decodes a sliding window of tokens (prefix/read offsets) so that each step costs
O(window), holds back text that ends in an incomplete UTF-8 sequence ("\ufffd")
until the bytes complete it or the request ends, and keeps the word-boundary
spacing that depends on the previous token. Stop strings are matched on the
text, across token boundaries; the text is cut before the first one found.
"""
from __future__ import annotations

import copy

_CONTEXT_TOKENS = 5


class TokenTexts:
    """Text of single tokens (cached: the vocabulary is bounded), for logprobs, and of whole prompts.

    Decodes with a private copy of the tokenizer: the frontend's tokenizing thread uses another,
    and a Rust-backed tokenizer shared across threads can fail with "Already borrowed".
    """

    def __init__(self, tokenizer) -> None:
        self._source, self._tokenizer = tokenizer, None
        self._cache: dict[int, str] = {}

    def _own(self):
        if self._tokenizer is None:
            self._tokenizer = copy.deepcopy(self._source)
        return self._tokenizer

    def token(self, token_id: int) -> str:
        if self._source is None:
            return ""
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._own().decode([token_id])
        return text

    def decode(self, token_ids: list[int]) -> str:
        return self._own().decode(token_ids) if self._source is not None else ""


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop or []
        # Longest stop string - 1: the most chars at the end that could still begin a stop string.
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""
        self.stopped_on: str | None = None
        self._shown = 0   # chars already returned by add_tokens
        # Whether decoding may wait until the text is read (`defer`): nothing decides on the text
        # meanwhile, i.e. there are no stop strings to find (and there is text at all).
        self.can_defer = not self.stop and tokenizer is not None
        # Tokens taken by `defer` and not decoded yet, and whether the request ended with them.
        self._deferred: list[int] = []
        self._deferred_final = False

    def defer(self, token_ids: list[int], final: bool = False) -> None:
        """`add_tokens` later, when the text is read (`flush`): one decode of the whole span
        instead of two per step, off the step loop while nobody reads the text."""
        self._deferred.extend(token_ids)
        self._deferred_final = self._deferred_final or final

    def flush(self) -> str:
        """Decode the deferred tokens; the text that became safe to show (as `add_tokens`)."""
        if not self._deferred and not self._deferred_final:
            return ""
        ids, self._deferred = self._deferred, []
        final, self._deferred_final = self._deferred_final, False
        return self.add_tokens(ids, final=final)

    def _decode(self, ids: list[int]) -> str:
        # A fast tokenizer's Rust backend decodes the same text as the transformers wrapper
        # (with clean-up off) at about a third of the cost, twice per token per step.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add_tokens(self, token_ids: list[int], final: bool = False) -> str:
        """Append generated tokens; return the text that became safe to show (see `visible_text`).

        `final`: the request ends with these tokens, so held-back bytes are flushed as they are.
        After a stop string appears, `stopped_on` is set and the text is cut before it.
        """
        if self.tokenizer is None or self.stopped_on is not None:
            return ""
        self.tokens.extend(token_ids)
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            self._append_checking_stop(new_text[len(prefix_text):])
        visible = self.visible_text(final or self.stopped_on is not None)
        delta, self._shown = visible[self._shown:], len(visible)
        return delta

    def visible_text(self, finished: bool) -> str:
        """Text safe to show: while running, the last chars that could begin a stop string are
        held back, so streamed text never has to be taken back. Never shrinks."""
        if finished or not self.stop or self.stopped_on is not None:
            return self.text
        return self.text[:max(0, len(self.text) - self._hold)]

    def _append_checking_stop(self, delta: str) -> None:
        before = len(self.text)
        self.text += delta
        if not self.stop:
            return
        # A stop string not found before can only end inside the new text.
        search_from = max(0, before - self._hold)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            cut, self.stopped_on = min(hits)
            self.text = self.text[:cut]
