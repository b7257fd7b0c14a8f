"""``make demo``: classify the shipped product reviews as POSITIVE / NEGATIVE / NEUTRAL on local processes.

The seed use case, offline: the vaderSentiment lexicon stands in for an LLM. Prints the joined
DataFrame's head, the failed rows, and a summary (rows, failures, time). ``make demo`` then runs
``notebooks/quickstart.ipynb`` headless with ``tests/notebook_runner.py`` (a source checkout's tool).
"""

from __future__ import annotations

import sys
import time

import pandas as pd

import modal_magic
from modal_magic.datasets import load_reviews
from modal_magic.datasets.sentiment import classify_sentiment


def main() -> int:
    """Run the demo; returns the process exit code."""
    sys.stdout.reconfigure(line_buffering=True)  # keep our lines in order with the bar's (on stderr)
    reviews = load_reviews()
    print(f"Classifying {len(reviews):,} product reviews on local processes...", flush=True)
    started = time.perf_counter()
    out = reviews.modal.map(classify_sentiment, column="text", into="sentiment")
    elapsed = time.perf_counter() - started
    with pd.option_context("display.width", 140, "display.max_colwidth", 60):
        print("\nThe joined DataFrame (first rows):")
        print(out[["product", "stars", "text", "sentiment", "sentiment_error"]].head(8).to_string())
        print("\nLabels:")
        print(out["sentiment"].value_counts(dropna=False).to_string())
        errors = out.modal.errors()
        print(f"\nFailed rows ({len(errors)}), from out.modal.errors():")
        print(errors[["error", "attempts"]].head().to_string() if len(errors) else "none")
    summary = modal_magic.last_run()
    assert summary is not None
    print(
        f"\nSummary: {summary.total:,} rows, {summary.succeeded:,} succeeded, {summary.failed:,} failed, "
        f"{summary.cached:,} from the cache (run before) in {elapsed:.2f}s ({summary.total / elapsed:,.0f} rows/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
