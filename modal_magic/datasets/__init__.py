"""Small offline datasets for modal_magic's demos, notebooks and tests: ``load_reviews`` returns
about 3,000 synthetic short English product reviews (ids, product names, review text and 1-5
star ratings) shipped inside the package as ``reviews.csv.gz``, so demos work without network
access; ``modal_magic.datasets.sentiment`` holds a matching offline sentiment classifier, and
``python -m tests.make_reviews`` (in a source checkout) regenerates the file deterministically.
"""

from __future__ import annotations

import gzip
import numbers
from importlib import resources

import pandas as pd

__all__ = ["load_reviews"]

_REVIEWS_FILE = "reviews.csv.gz"


def load_reviews(n: int | None = None) -> pd.DataFrame:
    """Load the shipped product reviews.

    The data are synthetic but realistic: many product categories, clearly positive, clearly
    negative, mixed and neutral reviews, typos, emoji, ALL CAPS, negation and sarcasm, a few
    long reviews, and a handful of blank ones (whitespace only or ``"N/A"``, never NaN) so that
    per-row errors show up in demos. Rows are in a fixed, shuffled order.

    Parameters
    ----------
    n : int or None, optional
        Return only the first ``n`` rows (all rows if ``n`` is larger than the dataset).
        ``None`` (the default) returns every row.

    Returns
    -------
    pandas.DataFrame
        One row per review, with a fresh ``RangeIndex`` and the columns

        - ``review_id`` (int64): unique id, starting at 1;
        - ``product`` (str): product name, e.g. ``"wireless headphones"``;
        - ``text`` (str): the review text, possibly empty or whitespace only;
        - ``stars`` (int64): star rating from 1 to 5.

    Raises
    ------
    TypeError
        If ``n`` is not an integer or ``None``.
    ValueError
        If ``n`` is negative.

    Examples
    --------
    >>> from modal_magic.datasets import load_reviews
    >>> df = load_reviews(5)
    >>> list(df.columns)
    ['review_id', 'product', 'text', 'stars']
    >>> len(df)
    5
    >>> bool(df["stars"].between(1, 5).all())
    True
    """
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"n must be an int or None, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")

    source = resources.files(__name__).joinpath(_REVIEWS_FILE)
    with source.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8", newline="") as fh:
        df = pd.read_csv(
            fh,
            dtype={"review_id": "int64", "product": str, "text": str, "stars": "int64"},
            # Blank and "N/A" reviews are data here, not missing values.
            keep_default_na=False,
            na_filter=False,
            nrows=None if n is None else int(n),
        )
    return df.reset_index(drop=True)
