"""Quality flags of one row, from its text, its generated tokens and its finish reason (CPU, no model).

| flag             | fires when (thresholds: pipeline.config.QualityConfig)                                    |
|------------------|-------------------------------------------------------------------------------------------|
| `empty`          | the text is empty or white space                                                          |
| `truncated`      | generation reached max_new_tokens (finish_reason `length`)                                |
| `repetition`     | in words or in tokens (text without spaces is judged too): one unit dominates, an n-gram  |
|                  | recurs, few distinct units, or the text ends in a loop of a repeated unit sequence         |
| `length_outlier` | a caption of fewer than min_caption_words words, or any text over max_words words          |
| `echo`           | most of the text's word bigrams are the prompt's (two words or more)                      |
| `not_text`       | a control character; replacement, private-use or unassigned characters (a share, or a few  |
|                  | anywhere: honest text has none); or hardly any letters                                     |

Tokens are the model's generated token ids; a suffix loop is also looked for in the characters
(loops of pieces shorter than a token, and rows of older outputs, which have no token ids).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

from pipeline.config import QualityConfig

# a word: a run of word characters, except that each CJK ideograph or kana counts as one (no spaces there)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
_BAD_CATEGORIES = {"Cc", "Co", "Cs", "Cn"}
_SPACE = re.compile(r"\s+")
_LETTERS = re.compile(r"[^\W\d_]+")  # letters (of any script): word characters but digits and underscore


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def quality_flags(text: str | None, *, prompt: str | None = None, task: str = "caption", token_ids: Sequence[int] | None = None,
                  finish_reason: str | None = None, cfg: QualityConfig | None = None) -> list[str]:
    """The flags of one generated text, in QUALITY_FLAGS order; [] for a good one."""
    cfg = cfg or QualityConfig()
    text = text or ""
    flags = []
    ws = words(text)
    if not text.strip():
        flags.append("empty")
    if finish_reason == "length":
        flags.append("truncated")
    if repetitive(ws, cfg.ngram_words, cfg) or repetitive(list(token_ids or ()), cfg.ngram_tokens, cfg) or character_loop(text, cfg):
        flags.append("repetition")
    if text.strip() and ((task == "caption" and len(ws) < cfg.min_caption_words) or len(ws) > cfg.max_words):
        flags.append("length_outlier")
    if ws and prompt and echoes(ws, words(prompt), cfg.echo_share):
        flags.append("echo")
    if text.strip() and not_text(text, cfg):
        flags.append("not_text")
    return flags


def repetitive(units: Sequence, n: int, cfg: QualityConfig) -> bool:
    """Repetition among units (words or tokens): a dominant unit, a recurring n-gram, a low unique
    ratio over the last `unique_window` units, or a suffix loop."""
    if not units:
        return False
    if len(units) >= cfg.dominant_min_units:
        counts = Counter(units)
        if counts.most_common(1)[0][1] >= cfg.dominant_share * len(units):
            return True
        tail = units[-cfg.unique_window:]
        if len(set(tail)) < cfg.min_unique_ratio * len(tail):
            return True
    if len(units) >= n * cfg.ngram_max_count:
        grams = Counter(tuple(units[i:i + n]) for i in range(len(units) - n + 1))
        if grams.most_common(1)[0][1] >= cfg.ngram_max_count:
            return True
    return suffix_loop(units, cfg.loop_max_period, cfg.loop_min_repeats, cfg.loop_min_units)


def suffix_loop(units: Sequence, max_period: int, min_repeats: int, min_units: int) -> bool:
    """The sequence ends with some period of at most max_period units repeated back to back at
    least min_repeats times, covering at least min_units units (the tail of a generation loop)."""
    n = len(units)
    for period in range(1, min(max_period, n // min_repeats) + 1):
        last = units[n - period:]
        repeats = 1
        while (repeats + 1) * period <= n and units[n - (repeats + 1) * period:n - repeats * period] == last:
            repeats += 1
        if repeats >= min_repeats and repeats * period >= min_units:
            return True
    return False


def character_loop(text: str, cfg: QualityConfig) -> bool:
    """A suffix loop in the text's non-space characters: a loop of pieces shorter than a token
    ("unsunsunsuns"), and the only token-like check of rows without token ids (older outputs)."""
    chars = list(_SPACE.sub("", text))
    return suffix_loop(chars, cfg.loop_max_period, cfg.loop_min_repeats + 1, cfg.loop_min_chars)


def echoes(text_words: list[str], prompt_words: list[str], share: float) -> bool:
    """At least `share` of the text's word bigrams are the prompt's. A one-word text is no echo: "Red."
    answers "Is it red or blue?"."""
    if len(text_words) < 2:
        return False
    mine = list(zip(text_words, text_words[1:]))
    theirs = set(zip(prompt_words, prompt_words[1:]))
    return sum(b in theirs for b in mine) >= share * len(mine)


def not_text(text: str, cfg: QualityConfig) -> bool:
    chars = _SPACE.sub("", text)
    if chars.endswith("\ufffd"):  # a multi-byte character cut by max_new_tokens: not the model's fault
        chars = chars[:-1]
    if not chars:
        return False
    # str.isprintable (in C) is false for every bad category (and for format characters): look closer only then
    if not (chars.isprintable() and "\ufffd" not in chars):
        categories = [unicodedata.category(c) for c in chars]
        if "Cc" in categories:  # a control character (tab, newline and CR are white space, gone above)
            return True
        bad = sum(c == "\ufffd" or k in _BAD_CATEGORIES for c, k in zip(chars, categories))
        if bad >= cfg.not_text_share * len(chars) or bad >= cfg.not_text_chars:
            return True
    letters = len(chars) - len(_LETTERS.sub("", chars))
    return len(chars) >= 8 and letters < cfg.min_letter_share * len(chars)
