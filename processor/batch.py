"""``TransferBatch``: transfers as fixed-width columns, from the client's arrays to a shard.

The fast form of ``create_transfers``. A batch is ten equal-length columns, the ones a
``Transfer`` has except its server-assigned timestamp. On the wire (``wire.CreateTransferBatch``)
each column is little-endian bytes of a fixed width per transfer, and the server views them
with ``numpy.frombuffer`` instead of decoding an object per transfer:

| column | width | values |
| --- | --- | --- |
| id, debit_account_id, credit_account_id, amount, pending_id | 8 bytes | 0 .. 2**63-1 |
| currency | 3 bytes | ISO 4217 letters A-Z |
| flags | 2 bytes | 0 .. 0xFFFF |
| timeout_s, code | 4 bytes | 0 .. 2**31-1 |

``user_data`` is a list of strings (each at most 128 characters), or empty when every
transfer's is empty. The answer is one result code per transfer, a byte each, in order.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from processor.currency import CURRENCY_EXPONENTS
from processor.types import CODE_MAX, ID_MAX, TIMEOUT_S_MAX, USER_DATA_CHARS_MAX, Transfer

if TYPE_CHECKING:
    from processor.ledger import TransferColumns

__all__ = ["BatchInvalid", "TransferBatch", "decode_batch", "encode_batch", "transfer_columns"]

_LE64 = np.dtype("<i8")
_LE32 = np.dtype("<u4")
_LE16 = np.dtype("<u2")
_CURRENCY = np.dtype("S3")
_INTEGER_COLUMNS = ("id", "debit_account_id", "credit_account_id", "amount", "pending_id")
_KNOWN_CURRENCIES = np.array(sorted(CURRENCY_EXPONENTS), dtype=_CURRENCY)


class BatchInvalid(ValueError):
    """A batch whose columns break the format; nothing of it is evaluated."""


@dataclass(frozen=True, slots=True, eq=False)
class TransferBatch:
    """Transfers as columns (the module docstring gives the format)."""

    id: np.ndarray
    debit_account_id: np.ndarray
    credit_account_id: np.ndarray
    amount: np.ndarray
    currency: np.ndarray
    flags: np.ndarray
    pending_id: np.ndarray
    timeout_s: np.ndarray
    code: np.ndarray
    user_data: list[str] | None = None
    # Set by the server from the caller's token and its audit record (``with_tenant``),
    # never sent by a client; None is the processor's own (slot 0), with no record.
    tenant: np.ndarray | None = None
    origin: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.id.shape[0]
        # A few transfers (a payment's posting, a single request) are checked value by
        # value: numpy's per-call overhead made the checks of a one-transfer batch cost
        # about 50 µs. Both ways raise the same error for the same batch (a property test).
        small = n <= _SCALAR_CHECK_MAX and self.currency.dtype == _CURRENCY
        check_range = _check_range_scalar if small else _check_range
        for name in (*_INTEGER_COLUMNS, "currency", "flags", "timeout_s", "code"):
            column = getattr(self, name)
            if column.ndim != 1 or column.shape[0] != n:
                raise BatchInvalid(f"column {name} has {column.shape[0]} values, id has {n}")
            if name in _INTEGER_COLUMNS:
                check_range(name, column, 0, ID_MAX)
        check_range("timeout_s", self.timeout_s, 0, TIMEOUT_S_MAX)
        check_range("code", self.code, 0, CODE_MAX)
        if small:
            _check_currencies_scalar(self.currency)
        else:
            _check_currencies(self.currency, n)
        if self.user_data is not None:
            if len(self.user_data) != n:
                raise BatchInvalid(f"user_data has {len(self.user_data)} values, id has {n}")
            for i, text in enumerate(self.user_data):
                if not isinstance(text, str) or len(text) > USER_DATA_CHARS_MAX or (
                        "\x00" in text):
                    raise BatchInvalid(f"user_data at index {i} is not a string of at most "
                                       f"{USER_DATA_CHARS_MAX} characters without U+0000")

    def __len__(self) -> int:
        return int(self.id.shape[0])

    # -- building -------------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        *,
        id: Any,
        debit_account_id: Any,
        credit_account_id: Any,
        amount: Any,
        currency: str | Any,
        flags: Any = None,
        pending_id: Any = None,
        timeout_s: Any = None,
        code: Any = None,
        user_data: Sequence[str] | None = None,
    ) -> TransferBatch:
        """A batch from numpy arrays or sequences of equal length; the optional columns
        default to zeros and empty user_data; ``currency`` may be one code for all.

        Raises ``BatchInvalid`` for columns of different lengths or values out of range.
        """
        ids = _integers("id", id, _LE64)
        n = ids.shape[0]

        def optional(name: str, values: Any, dtype: np.dtype) -> np.ndarray:
            return np.zeros(n, dtype=dtype) if values is None else _integers(name, values, dtype)

        currencies = _currencies(currency, n)
        if user_data is not None and len(user_data) != n:
            raise BatchInvalid(f"user_data has {len(user_data)} values, id has {n}")
        texts = None if user_data is None or not any(user_data) else list(user_data)
        return cls(
            ids, _integers("debit_account_id", debit_account_id, _LE64),
            _integers("credit_account_id", credit_account_id, _LE64),
            _integers("amount", amount, _LE64), currencies,
            optional("flags", flags, _LE16), optional("pending_id", pending_id, _LE64),
            optional("timeout_s", timeout_s, _LE32), optional("code", code, _LE32), texts,
        )

    @classmethod
    def from_transfers(cls, transfers: Sequence[Transfer]) -> TransferBatch:
        """The columns of ``transfers`` (whose timestamps must be zero)."""
        if any(t.timestamp for t in transfers):
            raise BatchInvalid("a transfer to create has no timestamp; the ledger sets it")
        return cls.from_arrays(
            id=[t.id for t in transfers],
            debit_account_id=[t.debit_account_id for t in transfers],
            credit_account_id=[t.credit_account_id for t in transfers],
            amount=[t.amount for t in transfers],
            currency=[t.currency for t in transfers],
            flags=[t.flags for t in transfers],
            pending_id=[t.pending_id for t in transfers],
            timeout_s=[t.timeout_s for t in transfers],
            code=[t.code for t in transfers],
            user_data=[t.user_data for t in transfers],
        )

    # -- the wire -------------------------------------------------------------------------

    def column_bytes(self) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes,
                                    bytes]:
        """The nine columns as little-endian bytes, in the order of the fields."""
        return (
            self.id.astype(_LE64).tobytes(), self.debit_account_id.astype(_LE64).tobytes(),
            self.credit_account_id.astype(_LE64).tobytes(),
            self.amount.astype(_LE64).tobytes(), self.currency.tobytes(),
            self.flags.astype(_LE16).tobytes(),
            self.pending_id.astype(_LE64).tobytes(), self.timeout_s.astype(_LE32).tobytes(),
            self.code.astype(_LE32).tobytes(),
        )

    @classmethod
    def from_bytes(cls, ids: bytes, debits: bytes, credits: bytes, amounts: bytes,
                   currencies: bytes, flags: bytes, pending: bytes, timeouts: bytes,
                   codes: bytes, user_data: list[str]) -> TransferBatch:
        """Columns viewed from bytes (no copy). Raises ``BatchInvalid``."""
        def view(name: str, raw: bytes, dtype: np.dtype) -> np.ndarray:
            if len(raw) % dtype.itemsize:
                raise BatchInvalid(f"column {name} is not a whole number of "
                                   f"{dtype.itemsize}-byte values")
            return np.frombuffer(raw, dtype=dtype)

        return cls(
            view("id", ids, _LE64), view("debit_account_id", debits, _LE64),
            view("credit_account_id", credits, _LE64), view("amount", amounts, _LE64),
            view("currency", currencies, _CURRENCY), view("flags", flags, _LE16),
            view("pending_id", pending, _LE64), view("timeout_s", timeouts, _LE32),
            view("code", codes, _LE32), user_data or None,
        )

    # -- for the ledger ---------------------------------------------------------------------

    def with_tenant(self, slot: int, origin: int = 0) -> TransferBatch:
        """The same transfers, made by the tenant whose slot is ``slot`` in the request
        whose audit record is ``origin``."""
        return self._with_server_columns(np.full(len(self), slot, dtype=_LE64),
                                         np.full(len(self), origin, dtype=_LE64))

    def _with_server_columns(self, tenant: np.ndarray, origin: np.ndarray) -> TransferBatch:
        """A copy with the server-set columns (``tenant``, ``origin``, as long as the batch)
        replaced. The client's columns are the same arrays, checked when this batch was
        made, and ``__post_init__`` checks nothing of the server's, so nothing is checked
        again."""
        copy = object.__new__(TransferBatch)
        for name in _FIELD_NAMES:
            object.__setattr__(copy, name, getattr(self, name))
        object.__setattr__(copy, "tenant", tenant)
        object.__setattr__(copy, "origin", origin)
        return copy

    def with_user_data(self, texts: list[str]) -> TransferBatch:
        """The same transfers with ``texts`` as their user_data (one per transfer; the
        edge's pseudonyms of personal values, actors/edge/personal.py)."""
        if len(texts) != len(self):
            raise BatchInvalid(f"user_data has {len(texts)} values, id has {len(self)}")
        return dataclasses.replace(self, user_data=texts if any(texts) else None)

    def _tenants(self) -> np.ndarray:
        return np.zeros(len(self), dtype=_LE64) if self.tenant is None else self.tenant

    def _origins(self) -> np.ndarray:
        return np.zeros(len(self), dtype=_LE64) if self.origin is None else self.origin

    def columns(self) -> TransferColumns:
        """The batch as the ledger's int64 columns (currency by number, 0 if unknown)."""
        # Imported here: clients use this module, and the ledger's kernels are not theirs.
        from processor.ledger import TransferColumns

        n = len(self)
        known = np.isin(self.currency, _KNOWN_CURRENCIES)
        # A currency's number is its three letters read as a little-endian integer.
        numbers = np.frombuffer(self.currency.astype("S8").tobytes(), dtype=_LE64) if n \
            else np.zeros(0, dtype=_LE64)
        return TransferColumns(
            self.id.astype(np.int64), self.debit_account_id.astype(np.int64),
            self.credit_account_id.astype(np.int64), self.amount.astype(np.int64),
            np.where(known, numbers, 0).astype(np.int64), self.flags.astype(np.int64),
            self.pending_id.astype(np.int64), self.timeout_s.astype(np.int64),
            self.code.astype(np.int64), np.zeros(n, dtype=np.int64), self.user_data,
            self._tenants().astype(np.int64), self._origins().astype(np.int64),
        )

    def transfers(self) -> list[Transfer]:
        """The batch as objects (the general path takes these)."""
        texts = self.user_data or [""] * len(self)
        return [
            Transfer(id=i, debit_account_id=d, credit_account_id=c, amount=a,
                     currency=cur.decode("ascii"), flags=f, pending_id=p, timeout_s=t, code=k,
                     user_data=u, tenant=ten, origin=o)
            for i, d, c, a, cur, f, p, t, k, u, ten, o in zip(
                self.id.tolist(), self.debit_account_id.tolist(),
                self.credit_account_id.tolist(), self.amount.tolist(), self.currency.tolist(),
                self.flags.tolist(), self.pending_id.tolist(), self.timeout_s.tolist(),
                self.code.tolist(), texts, self._tenants().tolist(),
                self._origins().tolist(), strict=True)
        ]

    def take(self, index: np.ndarray) -> TransferBatch:
        """The transfers at ``index``, in that order."""
        rows = index.tolist() if self.user_data is not None else None
        return TransferBatch(
            self.id[index], self.debit_account_id[index], self.credit_account_id[index],
            self.amount[index], self.currency[index], self.flags[index],
            self.pending_id[index], self.timeout_s[index], self.code[index],
            None if rows is None else [self.user_data[i] for i in rows],  # type: ignore[index]
            None if self.tenant is None else self.tenant[index],
            None if self.origin is None else self.origin[index],
        )

    @classmethod
    def concat(cls, parts: Sequence[TransferBatch]) -> TransferBatch:
        if len(parts) == 1:
            return parts[0]
        texts = None
        if any(p.user_data is not None for p in parts):
            texts = [t for p in parts for t in (p.user_data or [""] * len(p))]
        def joined(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])

        tenants = origins = None
        if any(p.tenant is not None or p.origin is not None for p in parts):
            tenants = np.concatenate([p._tenants() for p in parts])
            origins = np.concatenate([p._origins() for p in parts])
        return cls(joined("id"), joined("debit_account_id"), joined("credit_account_id"),
                   joined("amount"), joined("currency"), joined("flags"),
                   joined("pending_id"), joined("timeout_s"), joined("code"), texts, tenants,
                   origins)


# Below this many transfers, ``transfer_columns`` packs them without numpy.
SMALL_BATCH_MAX = 64
_LETTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


Columns = tuple[bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes]


def transfer_columns(transfers: Sequence[Transfer]) -> tuple[Columns, list[str]]:
    """``TransferBatch.from_transfers(transfers)``'s ``column_bytes()`` and user_data as
    sent (``[]`` when none has any), raising ``BatchInvalid`` where it would.

    A client sending a few transfers at a time (the payments engine posts one per saga
    step) paid more for numpy's per-array overhead than for the rest of the call; up to
    ``SMALL_BATCH_MAX`` transfers are packed with ``struct`` instead. The numpy path stays
    the reference model: tests/unit/test_batch_columns.py holds this one to it.
    """
    n = len(transfers)
    if n > SMALL_BATCH_MAX:
        batch = TransferBatch.from_transfers(transfers)
        return batch.column_bytes(), batch.user_data or []
    ids: list[int] = []
    debits: list[int] = []
    credits: list[int] = []
    amounts: list[int] = []
    pendings: list[int] = []
    flags: list[int] = []
    timeouts: list[int] = []
    codes: list[int] = []
    currencies: list[bytes] = []
    texts: list[str] = []
    for i, t in enumerate(transfers):
        if t.timestamp:
            raise BatchInvalid("a transfer to create has no timestamp; the ledger sets it")
        for name, value, high, out in (
                ("id", t.id, ID_MAX, ids), ("debit_account_id", t.debit_account_id, ID_MAX,
                                            debits),
                ("credit_account_id", t.credit_account_id, ID_MAX, credits),
                ("amount", t.amount, ID_MAX, amounts),
                ("pending_id", t.pending_id, ID_MAX, pendings),
                ("flags", t.flags, 0xFFFF, flags), ("timeout_s", t.timeout_s, TIMEOUT_S_MAX,
                                                   timeouts),
                ("code", t.code, CODE_MAX, codes)):
            if not isinstance(value, int):
                raise BatchInvalid(f"column {name} holds values that are not integers")
            if not 0 <= value <= high:
                raise BatchInvalid(f"{name} at index {i} is outside 0..{high}")
            out.append(int(value))
        currency = t.currency.encode("ascii", "replace") if isinstance(t.currency, str) \
            else bytes(t.currency)
        if len(currency) != 3 or not _LETTERS.issuperset(currency):
            raise BatchInvalid(f"currency at index {i} is not three letters A-Z")
        currencies.append(currency)
        texts.append(t.user_data)
    if not any(texts):
        texts = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or len(text) > USER_DATA_CHARS_MAX or "\x00" in text:
            raise BatchInvalid(f"user_data at index {i} is not a string of at most "
                               f"{USER_DATA_CHARS_MAX} characters without U+0000")
    columns: Columns = (
        struct.pack(f"<{n}q", *ids), struct.pack(f"<{n}q", *debits),
        struct.pack(f"<{n}q", *credits), struct.pack(f"<{n}q", *amounts),
        b"".join(currencies), struct.pack(f"<{n}H", *flags),
        struct.pack(f"<{n}q", *pendings), struct.pack(f"<{n}I", *timeouts),
        struct.pack(f"<{n}I", *codes),
    )
    return columns, texts


def _currencies(currency: str | Any, n: int) -> np.ndarray:
    """Currency codes as 3-byte ASCII; a code that is not ASCII becomes "???" (refused by
    the letters check)."""
    def code(c: Any) -> bytes:
        if isinstance(c, bytes):
            return c
        text = str(c)
        return text.encode("ascii") if text.isascii() and len(text) == 3 else b"???"

    if isinstance(currency, str | bytes):
        return np.full(n, code(currency), dtype=_CURRENCY)
    values = currency.tolist() if isinstance(currency, np.ndarray) else list(currency)
    return np.array([code(c) for c in values], dtype=_CURRENCY).reshape(-1)


def _integers(name: str, values: Any, dtype: np.dtype) -> np.ndarray:
    """``values`` as a 1-d array of ``dtype``; raises BatchInvalid for anything it cannot
    hold exactly (a negative number, one too large, a fraction)."""
    try:
        array = np.asarray(values)
        if array.size == 0:
            return np.zeros(0, dtype=dtype)
        if array.dtype.kind not in "iub":
            raise BatchInvalid(f"column {name} holds values that are not integers within "
                               f"0..{np.iinfo(dtype).max}")
        if array.ndim > 1:
            raise BatchInvalid(f"column {name} is not one-dimensional")
        if array.size and (array.min() < 0 or int(array.max()) > np.iinfo(dtype).max):
            raise BatchInvalid(f"column {name} has a value outside 0..{np.iinfo(dtype).max}")
        return array.astype(dtype).reshape(-1)
    except OverflowError as exc:
        raise BatchInvalid(f"column {name} has a value outside 0..{np.iinfo(dtype).max}") \
            from exc


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TransferBatch))
_SCALAR_CHECK_MAX = 8


def _check_range(name: str, column: np.ndarray, low: int, high: int) -> None:
    if column.size == 0:
        return
    bad = np.flatnonzero((column < low) | (column > high))
    if bad.size:
        raise BatchInvalid(f"{name} at index {int(bad[0])} is outside {low}..{high}")


def _check_range_scalar(name: str, column: np.ndarray, low: int, high: int) -> None:
    """``_check_range`` value by value, for a few values."""
    for i, value in enumerate(column.tolist()):
        if value < low or value > high:
            raise BatchInvalid(f"{name} at index {i} is outside {low}..{high}")


def _check_currencies(currency: np.ndarray, n: int) -> None:
    letters = currency.view(np.uint8).reshape(n, 3) if n else np.zeros((0, 3))
    bad = np.flatnonzero(((letters < ord("A")) | (letters > ord("Z"))).any(axis=1))
    if bad.size:
        raise BatchInvalid(f"currency at index {int(bad[0])} is not three letters A-Z")


def _check_currencies_scalar(currency: np.ndarray) -> None:
    """``_check_currencies`` code by code, for a few codes of dtype S3 (whose ``tolist``
    drops trailing zero bytes, so a shorter code is one with a zero byte)."""
    for i, code in enumerate(currency.tolist()):
        if len(code) != 3 or not all(65 <= letter <= 90 for letter in code):
            raise BatchInvalid(f"currency at index {i} is not three letters A-Z")


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(
    tuple[bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, list[str], bytes,
          bytes])


def encode_batch(batch: TransferBatch) -> bytes:
    """The batch as one message between actors (columns, user_data, tenants, origins)."""
    return _ENCODER.encode((*batch.column_bytes(), batch.user_data or [],
                            batch._tenants().astype(_LE64).tobytes(),
                            batch._origins().astype(_LE64).tobytes()))


def decode_batch(raw: bytes) -> TransferBatch:
    """Raises ``BatchInvalid`` (or msgspec.DecodeError for bytes that are no batch)."""
    (ids, debits, credits, amounts, currencies, flags, pending, timeouts, codes, user_data,
     tenants, origins) = _DECODER.decode(raw)
    batch = TransferBatch.from_bytes(ids, debits, credits, amounts, currencies, flags,
                                     pending, timeouts, codes, user_data)
    tenant = np.frombuffer(tenants, dtype=_LE64)
    origin = np.frombuffer(origins, dtype=_LE64)
    for name, column in (("tenant", tenant), ("origin", origin)):
        if column.shape[0] != len(batch):
            raise BatchInvalid(f"{name} has {column.shape[0]} values, id has {len(batch)}")
    return batch._with_server_columns(tenant, origin)
