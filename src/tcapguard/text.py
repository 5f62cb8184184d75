"""The one reading of a response that every step compares.

The filter groups the upload's answers by it (a backdoor's samples agree on one target), the
evaluation matches answers and triggers' targets by it, and the residual ASR's suspected target is
the flagged samples' commonest under it: with one reading, the target that the filter reports is
the one that the evaluation replays.
"""

from __future__ import annotations

import re
import unicodedata


def normalize(text: str) -> str:
    """Lower-case, NFKC, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())
