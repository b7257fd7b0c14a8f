"""Never pay twice: a map run again in a fresh process (another hash seed) finds every row cached.

Each scenario runs the same script in two fresh interpreters that share one cache directory; the
second must report every row cached and, for ``df.modal.llm``, send no request at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.openai_server.fixture import openai_env

PLAIN = textwrap.dedent('''
    import json, random, re, sys, time
    import pandas as pd
    import modal_magic

    LABELS = {"good": "positive", "bad": "negative"}
    STOP = {"the", "a", "an", "of"}
    WORD = re.compile(r"[a-z]+")
    rng = random.Random(7)  # module state that can't change what f computes

    def words(text):
        time.sleep(0.0001)  # costly enough that the cache stores every row (a row under ~2 µs isn't)
        return [w for w in WORD.findall(text.lower()) if w not in STOP]

    def label(text):
        found = [LABELS[w] for w in words(text) if w in LABELS]
        return found[0] if found else "neutral"

    def make(table):
        def classify(text):
            return table.get(label(text), 0)
        return classify

    random.random(); rng.random()  # moves the random module's state, as user code does between runs
    df = pd.DataFrame({"text": ["good film", "bad plot", "the end", "good and bad"] * 25})
    report = {}
    out = df.modal.map(make({"positive": 1, "negative": -1}), column="text", into="score", progress=False)
    report["closure"] = modal_magic.last_run().cached
    out = df.modal.map(lambda t: len(words(t)), column="text", into="n", progress=False)
    report["lambda"] = modal_magic.last_run().cached
    report["values"] = out["n"].tolist()[:4]
    print(json.dumps(report))
''')

LLM = textwrap.dedent('''
    import json, random
    import pandas as pd
    import modal_magic

    random.random()
    df = pd.DataFrame({"text": ["I loved it", "Terrible.", "It was fine", "I loved it"]})
    out = df.modal.llm("Classify the sentiment of: {text}", into="label", max_tokens=10, progress=False)
    print(json.dumps({"cached": modal_magic.last_run().cached, "labels": out["label"].tolist(),
                      "errors": out["label_error"].dropna().astype(str).tolist()}))
''')


def _run(script: str, cache_dir: str, seed: str, extra_env: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": seed, "MODAL_MAGIC_CACHE_DIR": cache_dir, **(extra_env or {})}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_plain_map_is_fully_cached_in_a_fresh_process(tmp_path):
    cache_dir = str(tmp_path / "cache")
    first = _run(PLAIN, cache_dir, "1")
    second = _run(PLAIN, cache_dir, "2")
    assert first["closure"] == 0 and first["lambda"] == 0
    assert second["closure"] == 100 and second["lambda"] == 100, second
    assert second["values"] == first["values"] == [2, 2, 1, 3]


def test_llm_answers_are_reused_after_a_restart(tmp_path, openai_server):
    cache_dir = str(tmp_path / "cache")
    env = openai_env(openai_server)
    first = _run(LLM, cache_dir, "1", env)
    sent = len(openai_server.requests)
    second = _run(LLM, cache_dir, "2", env)
    assert first["errors"] == [] and sent >= 3
    assert second == {**first, "cached": 4}, second
    assert len(openai_server.requests) == sent, "the second process sent requests again"
