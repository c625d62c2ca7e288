"""A shard's open holds by transfer id, with their deadlines in order.

Every batch a shard plans first expires the holds whose timeout passed. Finding them by
looking at every open hold made each batch cost O(open holds): a payments deployment keeps
each authorization's hold open until its capture, for days, so the cost of a single
transfer grew with the number of authorizations awaiting capture (planning one transfer
beside 100,000 open holds took 45 ms of CPU, docs/design.md §14). ``OpenHolds`` is the
dict the shard always had, plus a heap of the holds that have a deadline, so the due ones
cost O(due * log n) to find.

The heap is kept lazily: a hold that leaves before its deadline (posted, voided, undone)
leaves its entry behind, and an entry counts only while its hold is still open under the
same insertion. Stale entries are dropped as they reach the top, and the heap is rebuilt
from the open holds once stale entries outnumber them, so its size stays within twice the
open holds (plus a constant).

``pop_due`` answers due holds in the dict's insertion order, the order the shard used to
expire them in when it scanned the dict: expiries, their timestamps and their rows are
exactly what they were.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol, TypeVar

__all__ = ["OpenHolds"]

# The heap is rebuilt from the open holds once it has more entries than twice their number
# plus this many.
_STALE_SLACK = 64


class _Expiring(Protocol):
    @property
    def expires_at_ns(self) -> int: ...  # 0: never expires


V = TypeVar("V", bound=_Expiring)


class OpenHolds(dict[int, V]):
    """Open holds by id (a dict in every reading), whose due ones ``pop_due`` takes.

    Changed only by ``holds[id] = state``, ``del holds[id]``, ``pop``, ``pop_due`` and
    ``clear``.
    """

    __slots__ = ("_deadlines", "_order", "_orders", "_pushes")

    def __init__(self) -> None:
        super().__init__()
        # (expires_at_ns, insertion number, push number, id, state), a min-heap.
        self._deadlines: list[tuple[int, int, int, int, V]] = []
        self._order: dict[int, int] = {}  # id -> its insertion number (the dict's order)
        self._orders = itertools.count()
        self._pushes = itertools.count()

    def __setitem__(self, hold_id: int, state: V) -> None:
        if hold_id not in self:
            self._order[hold_id] = next(self._orders)
        super().__setitem__(hold_id, state)
        if state.expires_at_ns:
            heapq.heappush(self._deadlines, (state.expires_at_ns, self._order[hold_id],
                                             next(self._pushes), hold_id, state))

    def __delitem__(self, hold_id: int) -> None:
        super().__delitem__(hold_id)
        del self._order[hold_id]
        self._compact()

    _MISSING = object()

    def pop(self, hold_id: int, default: object = _MISSING) -> object:  # type: ignore[override]
        if hold_id in self:
            state = super().pop(hold_id)
            del self._order[hold_id]
            self._compact()
            return state
        if default is OpenHolds._MISSING:
            raise KeyError(hold_id)
        return default

    def clear(self) -> None:
        super().clear()
        self._order.clear()
        self._deadlines.clear()

    def setdefault(self, *_: object) -> V:
        raise TypeError("OpenHolds changes only by holds[id] = state, del, pop and clear")

    def update(self, *_: object, **__: object) -> None:
        raise TypeError("OpenHolds changes only by holds[id] = state, del, pop and clear")

    def popitem(self) -> tuple[int, V]:
        raise TypeError("OpenHolds changes only by holds[id] = state, del, pop and clear")

    def _live(self, entry: tuple[int, int, int, int, V]) -> bool:
        _, order, _, hold_id, state = entry
        return self.get(hold_id) is state and self._order[hold_id] == order

    def _drop_stale_top(self) -> None:
        deadlines = self._deadlines
        while deadlines and not self._live(deadlines[0]):
            heapq.heappop(deadlines)

    def _compact(self) -> None:
        if len(self._deadlines) > 2 * len(self) + _STALE_SLACK:
            self._deadlines = [e for e in self._deadlines if self._live(e)]
            heapq.heapify(self._deadlines)

    def any_due(self, now_ns: int) -> bool:
        """Whether some open hold's deadline is at or before ``now_ns``."""
        self._drop_stale_top()
        return bool(self._deadlines) and self._deadlines[0][0] <= now_ns

    def pop_due(self, now_ns: int) -> list[tuple[int, V]]:
        """Remove and answer the open holds whose deadline is at or before ``now_ns``, as
        (id, state) in insertion order."""
        due: list[tuple[int, int, V]] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now_ns:
            entry = heapq.heappop(deadlines)
            if self._live(entry):
                _, order, _, hold_id, state = entry
                super().__delitem__(hold_id)
                del self._order[hold_id]
                due.append((order, hold_id, state))
        self._compact()
        due.sort(key=lambda d: d[0])
        return [(hold_id, state) for _, hold_id, state in due]
