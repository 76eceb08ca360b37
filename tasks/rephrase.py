"""Deterministic, meaning-preserving rephrasings of fact-checking claims.

The paraphrased FEVER files of MEND / MALMEN are not available here, so the `fever` task builds
its equivalent claims with a small, fixed set of rewrites whose truth value equals the claim's
by construction:

* veridical frames (`WRAPPERS`): the whole claim is embedded unchanged under a frame that asserts
  it, e.g. "It is true that <claim>." or "According to Wikipedia, <claim>." (FEVER labels are
  defined against Wikipedia, so the reported form has the same label);
* one reordering (`move_time_phrase`): a sentence-initial date adverbial ("In 1986, ...",
  "On April 4, 1935, ...", "In the 1960s, ...") is moved to the end of the sentence. It is the only
  reordering applied because moving a *final* "in <year>" to the front can change what it
  attaches to ("starred in a film released in 1990"), while a fronted sentence adverbial
  modifies the whole clause wherever it stands.

No rewrite adds, drops or reorders a word of the claim body (the date phrase moves as one
unit), so a negation is never introduced or removed. The only change to the body is the case of
its first letter (lowered after a frame when the first word is a function word such as "The",
raised when the date phrase leaves the sentence start), which an uncased model does not see.
"""

from __future__ import annotations

import hashlib
import re

# Frames that assert the embedded claim; "{c}" is the claim without its final full stop.
WRAPPERS: tuple[str, ...] = (
    "It is true that {c}.",
    "According to Wikipedia, {c}.",
    "The claim that {c} is true.",
    "Wikipedia states that {c}.",
    "It is a fact that {c}.",
)

# Sentence-initial date adverbials that may move to the end (time of the whole clause).
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_TIME_PHRASE = re.compile(
    r"^(?P<phrase>In (?:the (?:early |late |mid-?)?)?\d{4}'?s?"
    rf"|In {_MONTH} \d{{4}}"
    rf"|On {_MONTH} \d{{1,2}}(?:st|nd|rd|th)?, \d{{4}}), (?P<body>\S.*)$"
)
# First words lowered when the claim no longer starts the sentence (never proper names).
_FUNCTION_WORDS = frozenset({"The", "A", "An", "There"})
_END = re.compile(r"\s*[.]\s*$")


def _body(claim: str) -> str:
    """The claim without surrounding space and its final full stop (other punctuation kept)."""
    return _END.sub("", claim.strip())


def _embed(claim: str) -> str:
    """The claim as it reads inside a frame: first word lowered if it is a function word."""
    body = _body(claim)
    first, _, rest = body.partition(" ")
    if first in _FUNCTION_WORDS and rest:
        return first.lower() + " " + rest
    return body


def move_time_phrase(claim: str) -> str | None:
    """'In 1986, X got married.' -> 'X got married in 1986.'; None when the claim has no such phrase."""
    m = _TIME_PHRASE.match(_body(claim))
    if m is None:
        return None
    phrase, body = m.group("phrase"), m.group("body")
    return f"{body[0].upper()}{body[1:]} {phrase[0].lower()}{phrase[1:]}."


def rephrase(claim: str, n: int = 2) -> tuple[str, ...]:
    """`n` distinct rephrasings of `claim`, chosen deterministically from the claim text.

    The date reordering is taken whenever it applies (it is the only rewrite that is not a
    frame); the frames are then taken in rotation from an offset given by a stable hash of the
    claim, so that different claims get different frames and the set does not depend on the
    Python hash seed.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    moved = move_time_phrase(claim)
    picks = [moved] if moved is not None else []
    inner = _embed(claim)
    start = int(hashlib.sha256(claim.encode("utf-8")).hexdigest()[:8], 16) % len(WRAPPERS)
    for k in range(len(WRAPPERS)):
        if len(picks) >= n:
            break
        picks.append(WRAPPERS[(start + k) % len(WRAPPERS)].format(c=inner))
    return tuple(picks[:n])
