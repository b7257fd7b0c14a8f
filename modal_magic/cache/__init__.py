"""Persistent per-row results, so re-running a cell only computes the rows that aren't done yet.

The package is split by idea:

- :mod:`~modal_magic.cache.location`: where the cache lives and keeping that place private;
- :mod:`~modal_magic.cache.keys`: row keys, a hash of the function's fingerprint and a row's inputs;
- :mod:`~modal_magic.cache.chunks`: many rows' results packed into one stored, checked chunk;
- :mod:`~modal_magic.cache.store`: :class:`RowCache`, the SQLite database of chunks;
- :mod:`~modal_magic.cache.default`: the process-wide cache and :func:`clear`;
- :mod:`~modal_magic.cache.rows`: the cache as one run of the engine uses it;
- :mod:`~modal_magic.cache.batches`: records of the OpenAI batches LLM runs submitted, for resuming.

The names users and tests rely on are importable from here.

Examples
--------
>>> import tempfile
>>> with tempfile.TemporaryDirectory() as directory, RowCache(directory) as cache:
...     keys = cache.row_keys("fingerprint-of-my-function", ["a", "b"])
...     print(cache.put_many([(keys[0], 1)]), cache.get_many(keys))
[] {0: 1}
"""

from __future__ import annotations

from ..fingerprint import function_fingerprint
from .default import clear, default_cache
from .keys import KEY_BYTES, RowKeyHasher, row_keys
from .location import CacheWarning, default_cache_dir
from .database import DB_NAME
from .batches import BatchRecords
from .store import RowCache

__all__ = [
    "RowCache",
    "CacheWarning",
    "function_fingerprint",
    "row_keys",
    "RowKeyHasher",
    "KEY_BYTES",
    "default_cache",
    "default_cache_dir",
    "clear",
    "DB_NAME",
    "BatchRecords",
]
