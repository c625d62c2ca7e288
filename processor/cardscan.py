"""Card data never enters: find card numbers in decoded JSON and in header values.

A *card number* is 13 to 19 digits, optionally separated by single spaces, dashes or
underscores, that passes the Luhn check (underscores too: ``pm_4111_1111_1111_1111`` must
not pass for a payment-method token). Digits are Unicode decimal digits
(``str.isdecimal``), so full-width or Arabic-Indic digits are no way around the check.

How long digit runs are treated: text is cut into *runs*, maximal stretches of digit
*groups* joined by single separators (``"order 12 4111-1111-1111-1111"`` holds the run
``12 4111-1111-1111-1111`` of five groups). A candidate is any stretch of whole consecutive
groups of a run holding 13 to 19 digits in all; a card number is found when a candidate
passes the Luhn check. So a card number is found wherever it sits in a run, including
next to other numbers separated from it by a space or dash, but never inside a group: a
group of more than 19 digits (an order reference, a long id, a 10,000-digit string) is no
card number and no window within it is tested. Testing every 13 to 19 digit window of a
long group would flag nearly every group of 20 or more random digits, since one window
in ten passes the Luhn check. The cost is that a card number glued to other digits with
no separator (``"004111111111111111"``) is not found, and neither is one split by two
separators or by another character (``"4111.1111.1111.1111"``).

Integers are not scanned: ids and amounts are integers and may be long. Nothing here ever
returns, logs or raises the digits found; a result is a JSON path or a boolean.

The work is linear in the length of the text. One precompiled regular expression finds the
runs of at least 13 digits; text without one costs no Python-level work per character, and
neither does a long group. Within a run, running Luhn sums make each candidate one
subtraction, and each group boundary ends at most 7 candidates.
"""

from __future__ import annotations

import re
from itertools import accumulate

from processor.types import require

__all__ = [
    "DIGITS_MAX",
    "DIGITS_MIN",
    "KEY_WITHHELD",
    "contains_card_number",
    "find_card_number",
]

DIGITS_MIN = 13
DIGITS_MAX = 19

# A run holding at least DIGITS_MIN digits. The lookahead rejects a shorter run after at
# most DIGITS_MIN digits; a longer one is then taken whole by single-character loops, which
# the regex engine runs fast even over a million digits. Neither part backtracks.
_RUN = re.compile(rf"(?=\d(?:[ _-]?\d){{{DIGITS_MIN - 1}}})\d+(?:[ _-]\d+)*")
_SEPARATOR = re.compile(r"[ _-]")
# A JSON object member name that may be written after a dot (RFC 9535 member-name-shorthand,
# restricted to ASCII); any other name is written in brackets.
_SHORTHAND = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Where a path would name an object member whose name holds a card number.
KEY_WITHHELD = "<key>"

# Luhn values of an ASCII digit as is, and doubled with 9 subtracted when the double has two
# digits (the value of a digit in an odd position counted from the right).
_PLAIN = bytes.maketrans(b"0123456789", bytes(range(10)))
_DOUBLED = bytes.maketrans(b"0123456789", bytes((0, 2, 4, 6, 8, 1, 3, 5, 7, 9)))


def contains_card_number(text: str) -> bool:
    """True if ``text`` holds a card number (see the module docstring for what counts)."""
    if len(text) < DIGITS_MIN:
        return False
    return any(_run_holds_card(run.group()) for run in _RUN.finditer(text))


def _prefix_sums(digits: str) -> tuple[list[int], list[int]]:
    """Running Luhn sums over ``digits``: the first doubles the digits at even indexes, the
    second those at odd indexes. Built by bytes operations, without a Python-level loop."""
    if not digits.isascii():
        digits = "".join(str(int(char)) for char in digits)
    raw = digits.encode("ascii")
    plain = raw.translate(_PLAIN)
    doubled = raw.translate(_DOUBLED)
    even = bytearray(plain)
    even[0::2] = doubled[0::2]
    odd = bytearray(plain)
    odd[1::2] = doubled[1::2]
    return list(accumulate(even, initial=0)), list(accumulate(odd, initial=0))


def _run_holds_card(run: str) -> bool:
    groups = _SEPARATOR.split(run)
    if len(groups) == 1 and len(run) > DIGITS_MAX:
        return False
    # Candidate digits [start, end) run between two group boundaries. Its last digit is not
    # doubled, so a digit at index i is doubled when i and end have the same parity, and the
    # candidate passes the Luhn check when the matching running sum grew by a multiple of
    # ten from start to end. Groups longer than DIGITS_MAX need no special case: no pair of
    # boundaries at most DIGITS_MAX apart can span one.
    sums = _prefix_sums("".join(groups))
    bounds = list(accumulate(map(len, groups), initial=0))
    first = 0
    for end in bounds:
        while bounds[first] < end - DIGITS_MAX:
            first += 1
        running = sums[end & 1]
        at = first
        while (start := bounds[at]) <= end - DIGITS_MIN:
            if (running[end] - running[start]) % 10 == 0:
                return True
            at += 1
    return False


# A path is kept as a chain of (parent, key or index, is_index) links and written out only
# when a card number is found, so the clean strings of a document cost no path text.
_Path = tuple["_Path | None", object, bool]


def _segment(key: object, is_index: bool) -> str:
    if is_index:
        return f"[{key}]"
    text = key if isinstance(key, str) else str(key)
    if _SHORTHAND.fullmatch(text):
        return "." + text
    if contains_card_number(text):
        # Only a key that is not a string (never one decoded from JSON) gets here: string
        # keys are scanned before the values under them.
        return "." + KEY_WITHHELD
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    # Braces keep an escape's hex digits from running into digits of the name beside it.
    escaped = "".join(c if c.isprintable() else f"\\u{{{ord(c):x}}}" for c in escaped)
    return f"['{escaped}']"


def _join(path: _Path | None) -> str:
    segments: list[str] = []
    while path is not None:
        path, key, is_index = path
        segments.append(_segment(key, is_index))
    return "$" + "".join(reversed(segments))


def find_card_number(value: object) -> str | None:
    """The JSON path of the first string in ``value`` that holds a card number, or None.

    ``value`` is decoded JSON: dicts, lists (and tuples), strings, numbers, booleans and
    None. Strings are scanned, and so are dict keys; numbers are not. Members are visited
    in document order, each key before its value. The path uses dot notation where the
    name allows it and brackets otherwise (``$.metadata.note``, ``$.items[2]['a b']``);
    when the card number is in a key, the key is not written and the path ends in
    ``.<key>`` (``$.metadata.<key>``). The path never holds the digits found.
    """
    root: _Path | None = None
    # Depth-first with an explicit stack, so that deeply nested input cannot exhaust the
    # interpreter's recursion limit. Each entry is (value, path, is_key).
    stack: list[tuple[object, _Path | None, bool]] = [(value, root, False)]
    while stack:
        item, path, is_key = stack.pop()
        if isinstance(item, str):
            if contains_card_number(item):
                found = _join(path) + ("." + KEY_WITHHELD if is_key else "")
                require(not contains_card_number(found), "a card scan path holds no card")
                return found
        elif isinstance(item, dict):
            entries: list[tuple[object, _Path | None, bool]] = []
            for key, member in item.items():
                entries.append((key, path, True))
                entries.append((member, (path, key, False), False))
            stack.extend(reversed(entries))
        elif isinstance(item, list | tuple):
            stack.extend(
                (element, (path, index, True), False)
                for index, element in reversed(list(enumerate(item)))
            )
    return None
