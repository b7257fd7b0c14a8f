"""GPU strings, checked on this machine before anything starts on Modal.

Modal takes ``gpu="T4"``, ``"A100-80GB"``, ``"H100:2"`` or a list of them as fallbacks and only
complains once the app is being created; a typo found there costs a round trip. :func:`parse_gpu`
knows Modal's GPU types and the per-type container limits, and says which names exist.
"""

from __future__ import annotations

import difflib

from .errors import OptionsError

__all__ = ["GPU_TYPES", "parse_gpu"]

# Modal's GPU types (upper-case, as the client sends them) and the most of each one container gets.
GPU_TYPES: dict[str, int] = {
    "T4": 8,
    "L4": 8,
    "A10": 4,
    "A10G": 4,
    "A100": 8,
    "A100-40GB": 8,
    "A100-80GB": 8,
    "L40S": 8,
    "H100": 8,
    "H100!": 8,
    "H200": 8,
    "B200": 8,
    "B200+": 8,
    "ANY": 1,
}


def parse_gpu(value: str) -> tuple[str, int]:
    """Split ``"TYPE[:COUNT]"`` into ``(TYPE, COUNT)`` after checking both against Modal's limits.

    Raises
    ------
    modal_magic.errors.OptionsError
        For an unknown type (naming the closest one) or a count out of range.

    Examples
    --------
    >>> parse_gpu("a100-80gb:2")
    ('A100-80GB', 2)
    >>> parse_gpu("T4")
    ('T4', 1)
    """
    name, _, count_text = value.strip().partition(":")
    gpu_type = name.upper()
    if gpu_type not in GPU_TYPES:
        close = difflib.get_close_matches(gpu_type, GPU_TYPES, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise OptionsError(f"unknown GPU type {name!r}: {hint}Modal offers {', '.join(GPU_TYPES)}")
    count = 1
    if count_text:
        if not count_text.isdigit():
            raise OptionsError(f"gpu={value!r}: the count after ':' must be a whole number, e.g. 'H100:2'")
        count = int(count_text)
    if not 1 <= count <= GPU_TYPES[gpu_type]:
        raise OptionsError(f"gpu={value!r}: a container can have 1 to {GPU_TYPES[gpu_type]} {gpu_type} GPUs")
    return gpu_type, count
