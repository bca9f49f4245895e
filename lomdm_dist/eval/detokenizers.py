"""Undo the tokenisation of the zero-shot corpora before GPT-2 BPE sees them.

PTB, WikiText and LM1B ship pre-tokenised text (``don 't``, ``1 @,@ 000``, ``( a )``); the MDLM and
BD3LM zero-shot numbers are measured on text with those splits undone, so the same rules are
applied here, in the same order (the order matters: e.g. WikiText's `` @-@ `` must go before the
generic punctuation rules). The rules are MDLM's (``dataloader.py``: ``wt_detokenizer``,
``ptb_detokenizer``, ``lm1b_detokenizer``, ``lambada_detokenizer``,
``scientific_papers_detokenizer``); they are heuristics, kept as they are so that numbers compare,
not corrected. The LM1B rules live in ``data_pipeline.sources`` (the LM1B training recipe uses them).
"""

from __future__ import annotations

import re
from typing import Callable

from data_pipeline.sources import lm1b_detokenize

# WikiText: (literal replacements, then regular expressions, then literal replacements).
_WT_LITERAL_FIRST = (("s '", "s'"),)
_WT_REGEX_FIRST = ((re.compile(r"/' [0-9]/"), r"/'[0-9]/"),)        # MDLM's rule; matches almost nothing
_WT_NUMBERS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_WT_PUNCTUATION = ((" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "))
_WT_BRACKETS = (
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
)
_WT_MISC = (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
            (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"))


def _replace_all(text: str, pairs) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def _substitute_all(text: str, rules) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def wikitext_detokenize(text: str) -> str:
    """WikiText-2/103 (raw): contractions, ``@-@``-style number separators, spaces before
    punctuation and inside brackets and quotes, heading markers ``= =``, degrees, ``N``."""
    text = _replace_all(text, _WT_LITERAL_FIRST)
    text = _substitute_all(text, _WT_REGEX_FIRST)
    text = _replace_all(text, _WT_NUMBERS)
    text = _replace_all(text, _WT_PUNCTUATION)
    text = _substitute_all(text, _WT_BRACKETS)
    return _replace_all(text, _WT_MISC)


_PTB_CONTRACTIONS = ((" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/"))
_PTB_AFTER_NUMBERS = (("$ 1", "$1"), ("# 1", "#1"), ("<unk>", "?"))
_PTB_NUMBER_PASSES = 10
"""PTB writes every number as ``N``. One pass of `` N `` -> `` 1 `` misses a second ``N`` that
shares its space with the first (``N N``); MDLM repeats the replacement ten times."""


def ptb_detokenize(text: str) -> str:
    """Penn Treebank (``ptb_text_only``): contractions, ``\\/``, numbers (``N`` -> ``1``, then
    ``$ 1`` -> ``$1``), and ``<unk>`` -> ``?``."""
    text = _replace_all(text, _PTB_CONTRACTIONS)
    for _ in range(_PTB_NUMBER_PASSES):
        text = text.replace(" N ", " 1 ")
    return _replace_all(text, _PTB_AFTER_NUMBERS)


def lambada_detokenize(text: str) -> str:
    """LAMBADA (OpenAI's test file): curly double quotes made straight, surrounding whitespace
    stripped, and a leading newline (each passage starts a new paragraph)."""
    text = text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"').replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"')
    return "\n" + text.strip()


def scientific_papers_detokenize(text: str) -> str:
    """PubMed and arXiv articles (``scientific_papers``): the WikiText rules, then the LM1B ones."""
    return lm1b_detokenize(wikitext_detokenize(text))


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext_detokenize,
    "ptb": ptb_detokenize,
    "lm1b": lm1b_detokenize,
    "lambada": lambada_detokenize,
    "scientific_papers": scientific_papers_detokenize,
}
