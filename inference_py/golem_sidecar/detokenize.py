"""An answer's text, grown one token at a time without decoding the whole answer again.

Each step decodes only a short window: the tokens since the last emitted piece, with the few
before them as context (the windowed decode of vLLM and TGI). Bytes of a character that is not
complete yet (a window ending in U+FFFD) stay held back until the next token completes them.
Byte-level tokenizers decode a window exactly as the same tokens inside the whole answer; the
final answer is still one full decode (``final``), so no tokenizer quirk can change an answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INCOMPLETE = "\ufffd"


@dataclass
class Detokenizer:
    tokenizer: Any
    ids: list[int] = field(default_factory=list)
    # The text of ids[:_read]; what is past it waits for a complete character.
    text: str = ""
    # The window's context starts here.
    _prefix: int = 0
    _read: int = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token: int) -> str:
        """Adds one token; returns the text it completed (often all of it, sometimes "")."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""
        piece = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece

    def final(self) -> str:
        """The whole answer decoded at once, as plain ``tokenizer.decode`` gives it."""
        return self._decode(self.ids)
