"""The audit log's heads as ledger anchors recorded them, held to the table
(processor.audit.check_audit_anchors): one row per case, the problems expected."""

from __future__ import annotations

import pytest

from processor.audit import GENESIS_DIGEST, AuditHead, check_audit_anchors

D1, D2, D3 = (bytes([n]) * 32 for n in (1, 2, 3))
STORED = {1: D1, 2: D2, 3: D3}  # the table holds events 1..3


@pytest.mark.parametrize(("heads", "stored", "last_id", "expected"), [
    # Every head there with its digest; the empty log's head too.
    ([AuditHead(1, 0, GENESIS_DIGEST), AuditHead(2, 2, D2), AuditHead(3, 3, D3)],
     STORED, 3, []),
    # The tail after event 1 removed: the head of 3 is gone.
    ([AuditHead(4, 3, D3)], {1: D1}, 1,
     [("audit_events", 3, "anchored_event_missing", "event 3 (anchor 4)", "last event 1")]),
    # Event 2 removed from the middle (the chain check names the gap; the anchor too).
    ([AuditHead(5, 2, D2)], {1: D1, 3: D3}, 3,
     [("audit_events", 2, "anchored_event_missing", "event 2 (anchor 5)", "no such event")]),
    # Event 3 rewritten with a digest of its own: named once, with the first anchor.
    ([AuditHead(6, 3, D3), AuditHead(7, 3, D3)], {**STORED, 3: D1}, 3,
     [("audit_events", 3, "anchored_digest_mismatch", f"{D3.hex()} (anchor 6)", D1.hex())]),
    # An anchor claiming an empty log with a digest: the anchor itself is forged.
    ([AuditHead(8, 0, D1)], STORED, 3,
     [("ledger_anchors", 8, "anchored_digest_mismatch", GENESIS_DIGEST.hex(), D1.hex())]),
])
def test_anchored_heads(heads: list[AuditHead], stored: dict[int, bytes], last_id: int,
                        expected: list[tuple[object, ...]]) -> None:
    """Each anchored head still in the table with its digest passes; a head gone or
    changed is named once, by table, event id, kind, expected and found."""
    problems = check_audit_anchors(heads, stored, last_id=last_id)
    assert [(p["table"], p["id"], p["kind"], p["expected"], p["found"])
            for p in problems] == expected
