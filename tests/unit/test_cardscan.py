"""processor.cardscan: card numbers are found in decoded JSON and text, and nothing else is."""

from __future__ import annotations

import random
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.cardscan import KEY_WITHHELD, contains_card_number, find_card_number


def luhn_ok(digits: str) -> bool:
    """The Luhn check written the textbook way, independently of the module."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value * 2 > 9 else value * 2
        total += value
    return total % 10 == 0


def with_check_digit(body: str) -> str:
    """``body`` followed by the digit that makes it pass the Luhn check."""
    for digit in "0123456789":
        if luhn_ok(body + digit):
            return body + digit
    raise AssertionError("a Luhn check digit always exists")


def join_groups(groups: tuple[str, ...], separators: str | tuple[str, ...]) -> str:
    """``groups`` joined by ``separators``: one string between every pair of groups, or
    ``separators[i]`` between group i and group i + 1."""
    if isinstance(separators, str):
        return separators.join(groups)
    pairs = zip(separators, groups[1:], strict=True)
    return groups[0] + "".join(separator + group for separator, group in pairs)


def reference(text: str) -> bool:
    """Brute force over the documented rule: every stretch of whole groups of every run."""
    for run in re.finditer(r"\d+(?:[ _-]\d+)*", text):
        groups = re.split(r"[ _-]", run.group())
        for start in range(len(groups)):
            for end in range(start + 1, len(groups) + 1):
                digits = "".join(groups[start:end])
                if 13 <= len(digits) <= 19 and luhn_ok(digits):
                    return True
    return False


# Test numbers published by card networks and processors; all pass the Luhn check. No card
# number may appear in the repository's text, so each is assembled here from short pieces.
VISA_GROUPS = ("4111", "1111", "1111", "1111")
VISA = join_groups(VISA_GROUPS, "")
VISA_SPACED = join_groups(VISA_GROUPS, " ")
VISA_BAD = VISA[:-1] + "2"  # VISA with its last digit changed: fails the Luhn check
VISA_4242 = "4242" * 4
MASTERCARD = "5555" * 3 + "4444"
AMEX_GROUPS = ("3782", "822463", "10005")  # the Amex 4-6-5 layout
AMEX = join_groups(AMEX_GROUPS, "")
DINERS = join_groups(("3056", "9309", "0259", "04"), "")
VISA_13 = "4" + "2" * 12
DISCOVER = join_groups(("6011", "0009", "9013", "9424"), "")
UNIONPAY_19 = with_check_digit("622126" + "0" * 12)

VALID = [
    VISA,
    VISA_4242,
    MASTERCARD,
    AMEX,  # 15 digits
    DINERS,  # 14 digits
    VISA_13,  # 13 digits
    DISCOVER,
    UNIONPAY_19,  # 19 digits
]


def test_the_fixtures_are_what_they_claim() -> None:
    """Every VALID number passes the textbook Luhn check and has 13 to 19 digits."""
    assert all(luhn_ok(number) and 13 <= len(number) <= 19 for number in VALID)
    assert not luhn_ok(VISA_BAD)


# Each row: text -> holds a card number.
TEXTS = [
    *[(number, True) for number in VALID],
    (VISA_SPACED, True),
    (join_groups(VISA_GROUPS, "-"), True),
    (join_groups(VISA_GROUPS, (" ", "-", " ")), True),  # mixed single separators
    (join_groups(AMEX_GROUPS, " "), True),  # the Amex 4-6-5 layout
    (" ".join(VISA), True),  # a separator between every digit
    (f"card: {VISA}, exp 12/29", True),
    ("order 12 " + VISA_SPACED, True),  # another number in the same run, before
    (VISA_SPACED + " 2029", True),  # and after
    (f"x{VISA}y", True),  # letters end a run
    ("\uff14" + "\uff11" * 15, True),  # VISA in full-width digits
    ("\uff14" + "\uff11" * 14 + "\uff12", False),  # VISA_BAD in full-width digits
    (VISA_BAD, False),  # Luhn fails
    (VISA[:12], False),  # 12 digits
    (join_groups(VISA_GROUPS, ("  ", " ", " ")), False),  # two separators end a run
    (join_groups(VISA_GROUPS, "."), False),  # dots are not separators
    (join_groups(VISA_GROUPS, "_"), True),  # underscores separate too
    ("pm_" + join_groups(VISA_GROUPS, "_"), True),  # dressed as a payment-method token
    ("0" * 20, False),  # one group of 20 digits is not a card, though windows of it pass
    ("1234567890" * 2 + "123", False),
    ("", False),
    ("no digits at all, just words", False),
    ("2026-05-09 12:34:56", False),
    ("+1 415-555-0132", False),
]


@pytest.mark.parametrize(("text", "expected"), TEXTS)
def test_contains_card_number(text: str, expected: bool) -> None:
    """Each text is classified as the documented rule says."""
    assert contains_card_number(text) is expected
    assert reference(text) is expected


def test_a_card_glued_to_other_digits_is_not_a_card() -> None:
    """Digits without a separator form one group; a group of 20+ digits is never a card."""
    glued = "9" + VISA + "99"
    assert not contains_card_number(glued)
    assert contains_card_number(f"9 {VISA} 99")


# Each row: document -> path of the first card number, or None.
DOCUMENTS = [
    ({"metadata": {"note": "pay " + VISA_SPACED}}, "$.metadata.note"),
    ({"items": [{"sku": "a"}, {"sku": VISA_4242}]}, "$.items[1].sku"),
    (["x", ["y", VISA_4242]], "$[1][1]"),
    (VISA_4242, "$"),
    ({"a b": VISA_4242}, "$['a b']"),
    ({"it's": {"\\": VISA_4242}}, "$['it\\'s']['\\\\']"),
    ({"1st": VISA_4242}, "$['1st']"),
    ({"caf\u00e9": VISA_4242}, "$['caf\u00e9']"),
    ({"tab\there": VISA_4242}, "$['tab\\u{9}here']"),
    ({"meta": {VISA_SPACED: "x"}}, "$.meta." + KEY_WITHHELD),
    ({VISA: {"note": VISA_4242}}, "$." + KEY_WITHHELD),
    # Document order: the first key's value before the second key.
    ({"a": {"z": VISA}, "b": VISA_4242}, "$.a.z"),
    ({"a": "clean", "b": ["clean", VISA_4242]}, "$.b[1]"),
    # Integers, floats and booleans are not scanned.
    ({"id": int(VISA), "amount": int(VISA_4242), "rate": 1.5, "ok": True}, None),
    ({"ids": [int(VISA), int(MASTERCARD)]}, None),
    ({"note": VISA_BAD}, None),
    ({}, None),
    ([], None),
    (None, None),
    (("tuple", VISA_4242), "$[1]"),
    ({5: VISA_4242}, "$['5']"),  # a key that is not a string (never from JSON)
    ({int(VISA): "x"}, None),  # an integer key is not scanned
    ({int(VISA): VISA_4242}, "$." + KEY_WITHHELD),
]


@pytest.mark.parametrize(("document", "path"), DOCUMENTS)
def test_find_card_number(document: object, path: str | None) -> None:
    """The path of the first card number in document order, or None when there is none."""
    assert find_card_number(document) == path


@pytest.mark.parametrize("number", VALID)
def test_the_path_never_holds_the_digits(number: str) -> None:
    """A card number in a key is withheld from the path, whatever its layout."""
    spaced = " ".join(number[i : i + 4] for i in range(0, len(number), 4))
    for key in (number, spaced, f"card {number}"):
        path = find_card_number({"outer": {key: "value"}})
        assert path == "$.outer.<key>"
        assert not any(char.isdigit() for char in path)


def test_deep_nesting_does_not_exhaust_the_stack() -> None:
    """A document nested 20,000 levels deep is walked without recursion."""
    document: object = VISA_4242
    for _ in range(20_000):
        document = [document]
    path = find_card_number(document)
    assert path == "$" + "[0]" * 20_000


def test_long_digit_runs_are_linear() -> None:
    """Long runs of digits, with or without separators, are scanned in linear time."""
    rng = random.Random(11)
    cases = [
        "7" * 10_000,
        "".join(rng.choice("0123456789") for _ in range(10_000)),
        "1 " * 5_000,
        "1234-" * 2_000,
    ]
    for text in cases:
        started = time.perf_counter()
        assert not contains_card_number(text)
        assert time.perf_counter() - started < 0.1
    started = time.perf_counter()
    assert not contains_card_number("7" * 1_000_000)
    assert time.perf_counter() - started < 0.5
    # The last candidate of a long spaced run is still found.
    assert contains_card_number("1 " * 5_000 + "x " + VISA_SPACED)


# --- properties ---------------------------------------------------------------------------

card_numbers = st.builds(
    lambda body: with_check_digit(body),
    st.text("0123456789", min_size=12, max_size=18),
)
# Text around a number: anything that does not put a digit right next to it.
surroundings = st.text(
    st.sampled_from("abcXYZ .,:;/-_()\n\u00e9\u4e2d") | st.sampled_from("0123456789"),
    max_size=30,
)


def layout(number: str, separators: list[str]) -> str:
    """``number`` with separators[i] (empty, space or dash) after its i-th digit."""
    return "".join(digit + separators[i] for i, digit in enumerate(number[:-1])) + number[-1]


@settings(max_examples=100, deadline=None)
@given(
    number=card_numbers,
    separators=st.lists(st.sampled_from(["", "", " ", "-"]), min_size=18, max_size=18),
    before=surroundings,
    after=surroundings,
)
def test_a_luhn_valid_number_is_found_anywhere(
    number: str, separators: list[str], before: str, after: str
) -> None:
    """Any Luhn-valid number of 13 to 19 digits, laid out with single separators, is found
    in any text that does not glue digits to it."""
    if before[-1:].isdigit():
        before += "x"
    if after[:1].isdigit():
        after = "x" + after
    text = before + layout(number, separators) + after
    assert contains_card_number(text)
    assert find_card_number({"metadata": {"note": text}}) == "$.metadata.note"


@settings(max_examples=100, deadline=None)
@given(
    body=st.text("0123456789", min_size=12, max_size=18),
    wrong=st.integers(1, 9),
    separators=st.lists(st.sampled_from(["", " ", "-"]), min_size=18, max_size=18),
    before=st.text("abc .,-\n", max_size=20),
    after=st.text("abc .,-\n", max_size=20),
)
def test_a_luhn_invalid_number_is_never_flagged(
    body: str, wrong: int, separators: list[str], before: str, after: str
) -> None:
    """A number failing the Luhn check, with no digit anywhere else, is not flagged."""
    valid = with_check_digit(body)
    number = valid[:-1] + str((int(valid[-1]) + wrong) % 10)
    text = before + layout(number, separators) + after
    # A stretch of whole groups shorter than the number may still pass Luhn by chance; the
    # oracle is the brute-force reference, and the whole number is never what is flagged.
    assert contains_card_number(text) is reference(text)
    if not any(separators[: len(number) - 1]):
        assert not contains_card_number(text)


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from("0123456789 -x"), max_size=80))
def test_matches_the_brute_force_reference(text: str) -> None:
    """On any text of digits, separators and letters, the scan agrees with brute force."""
    assert contains_card_number(text) is reference(text)


clean_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text("abcdefgh -.", max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text("abcdefgh _", max_size=6), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(document=clean_json, number=card_numbers, seed=st.integers(0, 2**32))
def test_a_card_planted_in_a_document_is_found_at_its_path(
    document: object, number: str, seed: int
) -> None:
    """A document of clean strings has no card; planting one in a fresh member of a random
    object or list makes find_card_number return exactly that member's path."""
    assert find_card_number(document) is None
    rng = random.Random(seed)
    # Walk to a random container, remembering the path; plant the number at its end.
    node, path = document, "$"
    while True:
        if isinstance(node, dict) and node and rng.random() < 0.7:
            key = rng.choice(sorted(node))
            if not isinstance(node[key], dict | list):
                break
            node = node[key]
            path += "." + key if re.fullmatch(r"[A-Za-z_]\w*", key) else f"['{key}']"
        elif isinstance(node, list) and node and rng.random() < 0.7:
            index = rng.randrange(len(node))
            if not isinstance(node[index], dict | list):
                break
            node, path = node[index], path + f"[{index}]"
        else:
            break
    if isinstance(node, dict):
        node["zz_planted"] = f"note {number}"
        expected = path + ".zz_planted"
    elif isinstance(node, list):
        node.append(f"note {number}")
        expected = path + f"[{len(node) - 1}]"
    else:
        document, expected = f"note {number}", "$"
    assert find_card_number(document) == expected
