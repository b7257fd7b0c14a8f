"""Tests for the shipped review dataset and the offline sentiment classifier."""

from __future__ import annotations

import gzip
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

from modal_magic.datasets import load_reviews
from modal_magic.datasets import sentiment
from modal_magic.datasets.sentiment import classify_sentiment, sentiment_scores

LABELS = ("POSITIVE", "NEGATIVE", "NEUTRAL")
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reviews() -> pd.DataFrame:
    return load_reviews()


@pytest.fixture(scope="module")
def labelled(reviews: pd.DataFrame) -> pd.DataFrame:
    def label(text: str) -> str:
        try:
            return classify_sentiment(text)
        except ValueError:
            return "ERROR"

    return reviews.assign(label=reviews["text"].map(label))


# --- load_reviews -----------------------------------------------------------------------------


def test_load_reviews_shape_columns_and_dtypes(reviews: pd.DataFrame) -> None:
    assert 2_800 <= len(reviews) <= 3_200
    assert list(reviews.columns) == ["review_id", "product", "text", "stars"]
    assert pd.api.types.is_integer_dtype(reviews["review_id"])
    assert pd.api.types.is_integer_dtype(reviews["stars"])
    assert pd.api.types.is_string_dtype(reviews["product"])
    assert pd.api.types.is_string_dtype(reviews["text"])
    assert isinstance(reviews.index, pd.RangeIndex)


def test_load_reviews_values(reviews: pd.DataFrame) -> None:
    assert reviews["review_id"].is_unique
    assert reviews["stars"].between(1, 5).all()
    assert set(reviews["stars"]) == {1, 2, 3, 4, 5}
    assert not reviews.isna().any().any()
    assert all(isinstance(t, str) for t in reviews["text"])
    assert reviews["product"].nunique() >= 20
    assert reviews["text"].nunique() >= 2_500


def test_load_reviews_has_edge_cases(reviews: pd.DataFrame) -> None:
    texts = reviews["text"]
    blank = texts.str.strip() == ""
    assert 3 <= blank.sum() <= 20
    assert (texts == "N/A").any()  # read as text, not as a missing value
    words = texts.str.split().str.len()
    assert (words >= 120).sum() >= 10  # a few long reviews
    assert texts.str.isupper().sum() >= 20  # some SHOUTING
    assert texts.str.contains("👍|😡|🔥|👎", regex=True).any()


def test_load_reviews_n() -> None:
    head = load_reviews(100)
    assert len(head) == 100
    assert list(head.columns) == ["review_id", "product", "text", "stars"]
    pd.testing.assert_frame_equal(head, load_reviews().head(100))
    assert (head["text"].str.strip() == "").any()  # small demos still show a per-row error
    assert len(load_reviews(0)) == 0


@pytest.mark.parametrize("bad", [-1, 2.5, "10", True])
def test_load_reviews_rejects_bad_n(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        load_reviews(bad)  # type: ignore[arg-type]


def test_data_file_is_small() -> None:
    data = resources.files("modal_magic.datasets").joinpath("reviews.csv.gz")
    assert len(data.read_bytes()) < 300_000


# --- classify_sentiment / sentiment_scores ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I love it, works perfectly!", "POSITIVE"),
        ("Terrible, broke after a day.", "NEGATIVE"),
        ("It is a phone case.", "NEUTRAL"),
    ],
)
def test_classify_sentiment(text: str, expected: str) -> None:
    assert classify_sentiment(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_classify_sentiment_rejects_blank(text: str) -> None:
    with pytest.raises(ValueError, match="empty review"):
        classify_sentiment(text)
    with pytest.raises(ValueError, match="empty review"):
        sentiment_scores(text)


def test_classify_sentiment_rejects_non_str() -> None:
    with pytest.raises(TypeError):
        classify_sentiment(None)  # type: ignore[arg-type]


def test_sentiment_scores() -> None:
    scores = sentiment_scores("I love it, works perfectly!")
    assert set(scores) == {"neg", "neu", "pos", "compound"}
    assert all(isinstance(v, float) for v in scores.values())
    assert scores["compound"] >= 0.05
    assert abs(scores["neg"] + scores["neu"] + scores["pos"] - 1) < 0.01


def test_analyzer_is_created_once() -> None:
    classify_sentiment("fine")
    first = sentiment._analyzer
    assert first is not None
    classify_sentiment("great")
    assert sentiment._analyzer is first


def test_functions_pickle_by_reference() -> None:
    import pickle

    assert pickle.loads(pickle.dumps(classify_sentiment)) is classify_sentiment
    assert pickle.loads(pickle.dumps(sentiment_scores)) is sentiment_scores


def test_missing_vader_gives_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sentiment, "_analyzer", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(ImportError, match=r"pip install 'modal_magic\[demo\]'"):
        classify_sentiment("hello there")


# --- the dataset and the classifier together -------------------------------------------------


def test_labels_are_a_mix(labelled: pd.DataFrame) -> None:
    shares = labelled["label"].value_counts(normalize=True)
    for label in LABELS:
        assert shares.get(label, 0.0) >= 0.10, shares.to_dict()
    errors = (labelled["label"] == "ERROR").sum()
    assert 1 <= errors <= 20


def test_stars_correlate_with_sentiment(labelled: pd.DataFrame) -> None:
    mean_stars = labelled.groupby("label")["stars"].mean()
    assert mean_stars["POSITIVE"] > mean_stars["NEUTRAL"] > mean_stars["NEGATIVE"]
    assert mean_stars["POSITIVE"] - mean_stars["NEGATIVE"] >= 1.0
    # ...but not perfectly: some POSITIVE-sounding reviews (sarcasm, mixed) have few stars.
    assert (labelled.loc[labelled["label"] == "POSITIVE", "stars"] <= 2).any()
    assert (labelled.loc[labelled["label"] == "NEGATIVE", "stars"] >= 4).any()


# --- regeneration ---------------------------------------------------------------------------


def test_generator_reproduces_shipped_file(tmp_path: Path) -> None:
    out = tmp_path / "reviews.csv.gz"
    subprocess.run(
        [sys.executable, "-m", "tests.make_reviews", "--out", str(out)],
        check=True,
        cwd=REPO_ROOT,
        capture_output=True,
    )
    shipped = resources.files("modal_magic.datasets").joinpath("reviews.csv.gz").read_bytes()
    regenerated = out.read_bytes()
    # Compare the content first for a readable failure, then the exact bytes.
    assert gzip.decompress(regenerated) == gzip.decompress(shipped)
    assert regenerated == shipped
