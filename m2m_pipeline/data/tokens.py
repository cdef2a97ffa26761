"""CLIP BPE token counting with open_clip's tokenizer (same BPE as Stable Diffusion's text encoder)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

# open_clip (and torch under it) is imported on first use: reading a caption table or `m2m --help` needs neither.


@lru_cache(maxsize=1)
def clip_tokenizer() -> Any:
    from open_clip.tokenizer import SimpleTokenizer

    # The BPE vocabulary ships inside the open_clip package, so this works offline.
    return SimpleTokenizer()


def normalise_caption(text: str) -> str:
    """ftfy repair, HTML-entity unescape and whitespace collapse: open_clip's own cleaning, case kept.

    Storing the cleaned text (not the raw alt-text) means the prompt Stable Diffusion sees is the text
    whose tokens were counted: HF's CLIPTokenizer does not unescape "&amp;", open_clip does.
    """
    from open_clip.tokenizer import _clean_whitespace

    return _clean_whitespace(text)


def clip_token_count(text: str) -> int:
    """Tokens CLIP's text encoder would need for `text`, start and end tokens included (no truncation)."""
    return len(clip_tokenizer().encode(text)) + 2
