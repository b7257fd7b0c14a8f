"""Offline sentiment classification for the demo, built on the VADER lexicon (vaderSentiment).

The analyzer is created lazily, once per process, and cached at module level: functions here
are pickled by reference, so each worker process builds its own analyzer on first use instead of
shipping one over the wire. vaderSentiment is imported inside the functions, so importing this
module works without the ``demo`` extra installed.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

__all__ = ["classify_sentiment", "sentiment_scores", "POSITIVE_THRESHOLD", "NEGATIVE_THRESHOLD"]

#: VADER's conventional thresholds on the compound score.
POSITIVE_THRESHOLD = 0.05
NEGATIVE_THRESHOLD = -0.05

_IMPORT_ERROR = "classify_sentiment needs vaderSentiment: pip install 'modal_magic[demo]'"

_analyzer: SentimentIntensityAnalyzer | None = None
_analyzer_lock = threading.Lock()


def _get_analyzer() -> SentimentIntensityAnalyzer:
    """Return this process's analyzer, creating it on first use."""
    global _analyzer
    if _analyzer is None:
        with _analyzer_lock:
            if _analyzer is None:
                try:
                    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
                except ImportError as exc:
                    raise ImportError(_IMPORT_ERROR) from exc
                _analyzer = SentimentIntensityAnalyzer()
    return _analyzer


def _check_text(text: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"review text must be str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("empty review")


def sentiment_scores(text: str) -> dict[str, float]:
    """Return VADER's polarity scores for one review.

    Parameters
    ----------
    text : str
        The review text.

    Returns
    -------
    dict of str to float
        ``{"neg": ..., "neu": ..., "pos": ..., "compound": ...}``; ``neg``/``neu``/``pos`` are
        proportions in [0, 1] and ``compound`` is the normalised score in [-1, 1].

    Raises
    ------
    ValueError
        If ``text`` is empty or whitespace only (message ``"empty review"``).
    TypeError
        If ``text`` is not a string.
    ImportError
        If vaderSentiment is not installed.

    Examples
    --------
    >>> scores = sentiment_scores("I love it, works perfectly!")
    >>> sorted(scores)
    ['compound', 'neg', 'neu', 'pos']
    >>> scores["compound"] > 0.05
    True
    """
    _check_text(text)
    scores = _get_analyzer().polarity_scores(text)
    return {key: float(scores[key]) for key in ("neg", "neu", "pos", "compound")}


def classify_sentiment(text: str) -> str:
    """Classify one review as ``"POSITIVE"``, ``"NEGATIVE"`` or ``"NEUTRAL"``.

    Uses VADER's compound score with the usual thresholds: ``>= 0.05`` is positive,
    ``<= -0.05`` is negative, anything in between is neutral.

    ``text`` is the review, as for :func:`sentiment_scores`; the label is returned as a ``str``.

    Raises
    ------
    ValueError, TypeError, ImportError
        As :func:`sentiment_scores`. In ``df.modal.map(classify_sentiment, column="text")`` an
        empty review ends up in the error column instead of stopping the whole run.

    Examples
    --------
    >>> classify_sentiment("I love it, works perfectly!")
    'POSITIVE'
    >>> classify_sentiment("Terrible, broke after a day.")
    'NEGATIVE'
    >>> classify_sentiment("It is a phone case.")
    'NEUTRAL'
    """
    compound = sentiment_scores(text)["compound"]
    if compound >= POSITIVE_THRESHOLD:
        return "POSITIVE"
    if compound <= NEGATIVE_THRESHOLD:
        return "NEGATIVE"
    return "NEUTRAL"
