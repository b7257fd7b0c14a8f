"""One stored chunk: many rows' keys side by side and their values in one pickle, with a keyed MAC.

The store (:mod:`modal_magic.cache.store`) keeps one SQLite row per chunk; this module turns rows
into chunks and back (:mod:`modal_magic.cache.match` finds which chunk holds a key).
"""

from __future__ import annotations

import hmac
import pickle
from hashlib import blake2b
from typing import Any, Sequence

from .keys import KEY_BYTES

#: the format of one chunk (MAC framing + pickled list); a chunk of another format is a miss.
#: 1: an unkeyed checksum (anyone could recompute it); 2: a MAC keyed with the user's secret
CHUNK_FORMAT = 2
_MAC_PERSON = b"modal_magic-m2"


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


def part_number(part: bytes) -> int:
    return int.from_bytes(part, "big")


def chunk_mac(key: bytes, keys_blob: bytes, value_blob: bytes) -> bytes:
    """BLAKE2b keyed with the user's secret over a chunk's keys and pickled values.

    Keyed, so that whoever can write the database file but doesn't hold the key (another user, a
    synced or shared folder, a planted file) can't make a chunk that passes: a recomputed unkeyed
    checksum let a rewritten value be unpickled, which runs the writer's code.

    Examples
    --------
    >>> chunk_mac(b"k" * 32, b"keys", b"values") != chunk_mac(b"K" * 32, b"keys", b"values")
    True
    """
    h = blake2b(digest_size=16, key=key, person=_MAC_PERSON)
    h.update(len(keys_blob).to_bytes(8, "little"))
    h.update(keys_blob)
    h.update(value_blob)
    return h.digest()


def unpack(fmt: int, n: int, mac: bytes, keys_blob: bytes, value_blob: bytes,
           expected_keys: bytes, key: bytes) -> list[Any] | None:
    """The chunk's values, or ``None`` when anything about it doesn't hold up.

    The MAC is checked before anything is unpickled: a chunk this user's key didn't sign is never
    loaded.
    """
    if fmt != CHUNK_FORMAT or keys_blob != expected_keys or len(keys_blob) != KEY_BYTES * n:
        return None
    if not isinstance(mac, bytes) or not hmac.compare_digest(chunk_mac(key, keys_blob, value_blob), mac):
        return None
    try:
        values = pickle.loads(value_blob)
    except Exception:  # e.g. a class this kernel hasn't defined (yet)
        return None
    if type(values) is not list or len(values) != n:
        return None
    return values


#: values that can be handed to several rows as one object: nothing can change them in place
IMMUTABLE = frozenset({int, float, bool, str, bytes, complex, type(None)})


def own_copy(value: Any) -> Any:
    """``value`` itself when it is immutable, else a deep copy: one row's object is never another's.

    A copy through pickle, since a stored value is one that pickled in the first place.

    Examples
    --------
    >>> shared = [1, 2]
    >>> own_copy(shared) == shared, own_copy(shared) is shared, own_copy("text") is own_copy("text")
    (True, False, True)
    """
    kind = type(value)
    if kind in IMMUTABLE or (kind is tuple and all(type(item) in IMMUTABLE for item in value)):
        return value
    return pickle.loads(dumps(value))


def pack(keys_blob: bytes, values: list[Any], rejected: list[tuple[bytes, str]], max_entry_bytes: int,
         max_chunk_bytes: int) -> list[tuple[bytes, int, bytes]]:
    """Pickle values into chunks of ``(keys blob, n, pickled list)``; report in ``rejected`` the ones
    that can't go (unpicklable, or over ``max_entry_bytes`` pickled).

    Examples
    --------
    >>> rejected = []
    >>> [(n, len(keys)) for keys, n, _ in pack(b"k" * 32, ["a", "b"], rejected, 1000, 1000)], rejected
    ([(2, 32)], [])
    """
    try:
        blob = dumps(values)
    except Exception:
        blob = None
    if blob is not None and len(blob) <= min(max_chunk_bytes, max_entry_bytes):
        return [(keys_blob, len(values), blob)]
    # Slow path: find the values that can't be pickled or are too large, group the rest by size.
    sized: list[tuple[bytes, Any, int]] = []
    for i, value in enumerate(values):
        key = keys_blob[KEY_BYTES * i : KEY_BYTES * (i + 1)]
        try:
            size = len(dumps(value))
        except Exception as e:
            rejected.append((key, f"the result can't be pickled: {type(e).__name__}: {e}"))
            continue
        if size > max_entry_bytes:
            rejected.append((key, f"the result is too large to cache: {size / 2**20:.1f} MiB pickled, "
                                  f"over the {max_entry_bytes / 2**20:.0f} MiB per-row limit"))
            continue
        sized.append((key, value, size))
    chunks: list[tuple[bytes, int, bytes]] = []
    group: list[tuple[bytes, Any, int]] = []
    total = 0
    for entry in sized + [None]:  # type: ignore[list-item]
        if group and (entry is None or total + entry[2] > max_chunk_bytes):
            try:
                chunks.append((b"".join(k for k, _, _ in group), len(group), dumps([v for _, v, _ in group])))
            except Exception as e:  # pickled one by one but not together: report, don't guess
                rejected += [(k, f"the result can't be pickled: {type(e).__name__}: {e}") for k, _, _ in group]
            group, total = [], 0
        if entry is not None:
            group.append(entry)
            total += entry[2]
    return chunks
