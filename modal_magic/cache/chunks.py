"""One stored chunk: many rows' keys side by side and their values in one pickle, with a checksum.

The store (:mod:`modal_magic.cache.store`) keeps one SQLite row per chunk; this module turns rows
into chunks and back, and decides which chunk's copy of a key is current.
"""

from __future__ import annotations

import pickle
from hashlib import blake2b
from itertools import repeat
from typing import Any, Sequence

import numpy as np

from .keys import KEY_BYTES

#: the format of one chunk (checksum framing + pickled list); a chunk of another format is a miss
CHUNK_FORMAT = 1
_CHECKSUM_PERSON = b"modal_magic-c1"


def dumps(obj: Any) -> bytes:
    """Pickle fast with the standard pickler; fall back to cloudpickle for notebook-defined objects.

    The cache's own copy (not the worker's): what a stored value is made of is the cache's file
    format, and must not change when the way batches travel to workers does.

    Examples
    --------
    >>> pickle.loads(dumps([1, "a"]))
    [1, 'a']
    """
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(obj, protocol=5)


def join_keys(keys: Sequence[bytes | None]) -> bytes | None:
    """All keys end to end (``None`` ones left out); ``None`` when there are none."""
    try:
        joined = b"".join(keys)  # type: ignore[arg-type]
    except TypeError:
        joined = b"".join(key for key in keys if key is not None)
    if len(joined) % KEY_BYTES:
        raise ValueError(f"cache keys are {KEY_BYTES} bytes long; use row_keys() to make them")
    return joined or None


def key_parts(joined: bytes) -> list[bytes]:
    """The distinct 4-byte fingerprint tags among keys joined end to end (usually just one)."""
    tags = np.frombuffer(joined, dtype="<u4")[:: KEY_BYTES // 4]
    if (tags == tags[0]).all():
        return [joined[:4]]
    return [int(t).to_bytes(4, "little") for t in np.unique(tags)]


def part_number(part: bytes) -> int:
    return int.from_bytes(part, "big")


def chunk_checksum(keys_blob: bytes, value_blob: bytes) -> bytes:
    h = blake2b(digest_size=16, person=_CHECKSUM_PERSON)
    h.update(len(keys_blob).to_bytes(8, "little"))
    h.update(keys_blob)
    h.update(value_blob)
    return h.digest()


def unpack(fmt: int, n: int, checksum: bytes, keys_blob: bytes, value_blob: bytes,
            expected_keys: bytes) -> list[Any] | None:
    """The chunk's values, or ``None`` when anything about it doesn't hold up."""
    if fmt != CHUNK_FORMAT or keys_blob != expected_keys or len(keys_blob) != KEY_BYTES * n:
        return None
    if not isinstance(checksum, bytes) or chunk_checksum(keys_blob, value_blob) != checksum:
        return None
    try:
        values = pickle.loads(value_blob)
    except Exception:  # e.g. a class this kernel hasn't defined (yet)
        return None
    if type(values) is not list or len(values) != n:
        return None
    return values


Located = tuple[int, bytes, Sequence[int], Sequence[int]]  # (chunk id, keys blob, positions in it, indexes asked)


def newest_wins(located: list[Located]) -> list[Located]:
    """Drop hits that a newer chunk (a refresh, a retry) also holds; ``located`` is in id order."""
    spans = sorted((indexes.start, indexes.stop) for _, _, _, indexes in located if type(indexes) is range)
    if len(spans) == len(located) and all(stop <= start for (_, stop), (start, _) in zip(spans, spans[1:])):
        return located  # disjoint runs of the keys asked for: nothing is shadowed
    total = sum(len(indexes) for _, _, _, indexes in located)
    owner: dict[int, int] = {}
    for chunk_id, _, _, indexes in located:
        owner.update(zip(indexes, repeat(chunk_id)))
    if len(owner) == total:
        return located
    kept = []
    for chunk_id, keys_blob, positions, indexes in located:
        pairs = [(j, i) for j, i in zip(positions, indexes) if owner[i] == chunk_id]
        if pairs:
            kept.append((chunk_id, keys_blob, [j for j, _ in pairs], [i for _, i in pairs]))
    return kept

