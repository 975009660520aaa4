"""The VQA answer normalisation (Antol et al. 2015; the VQAv2 evaluation's processing of answers).

In order: newlines/tabs to spaces; punctuation removed (or replaced by a space when it is glued
between words and no digit,digit comma is present); periods not part of a number removed; then,
word by word on the lower-cased text, number words zero..ten to digits, the articles a/an/the
dropped and apostrophe-less contractions restored ("dont" -> "don't").
"""

from __future__ import annotations

import itertools
import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
PERIOD_NOT_IN_NUMBER = re.compile(r"(?!<=\d)(\.)(?!\d)")
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
# The contracted forms of the VQA table; each is restored from its forms with apostrophes left out.
CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't shouldn't've
somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd
something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas
wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's
who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're
you've""".split()


def _contractions() -> dict[str, str]:
    table = {}
    for form in CONTRACTED:
        apostrophes = [i for i, char in enumerate(form) if char == "'"]
        for count in range(1, len(apostrophes) + 1):
            for dropped in itertools.combinations(apostrophes, count):
                table["".join(c for i, c in enumerate(form) if i not in dropped)] = form
    return table


CONTRACTIONS = _contractions()


def strip_punctuation(text: str) -> str:
    glued_or_numeric = COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if glued_or_numeric or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_NOT_IN_NUMBER.sub("", out)


def digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """An answer in the form VQA compares answers in."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return digits_and_articles(strip_punctuation(text))
