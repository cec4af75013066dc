"""Tests of export/data.py: the number corpus rules and user-corpus validation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from export.data import (
    SUPPORTED_LANGS,
    CorpusError,
    CorpusProblem,
    NumberCorpusConfig,
    Pair,
    number_corpus,
    number_pair,
    number_splits,
    read_parallel,
    read_tsv,
    user_corpus,
    write_tsv,
)

SMALL = NumberCorpusConfig(lang="de", max_digits=6, train_size=2000, seed=1)


@pytest.fixture(scope="module")
def small_splits():
    return number_corpus(SMALL)


# ------------------------------------------------------------------------------------------
# Number corpus
# ------------------------------------------------------------------------------------------


def test_number_pair_known_examples() -> None:
    assert number_pair(321, "de") == Pair(
        "three hundred and twenty-one", "dreihunderteinundzwanzig", "digits=3"
    )
    assert number_pair(0, "de") == Pair("zero", "null", "digits=1")
    assert number_pair(21, "fr") == Pair("twenty-one", "vingt et un", "digits=2")
    assert number_pair(1000, "es") == Pair("one thousand", "mil", "digits=4")


def test_number_corpus_deterministic(small_splits) -> None:
    assert number_corpus(SMALL) == small_splits
    other = number_corpus(NumberCorpusConfig(train_size=2000, seed=2))
    assert other.train != small_splits.train
    assert other.test != small_splits.test


def test_number_splits_disjoint_and_consistent(small_splits) -> None:
    nums = number_splits(SMALL)
    train, dev, test = set(nums.train), set(nums.dev), set(nums.test)
    assert not train & dev
    assert not train & test
    assert not dev & test
    assert len(nums.dev) == len(dev) and len(nums.test) == len(test)  # each held out once
    # The pairs are exactly the words of those numbers, in order.
    assert small_splits.test == [number_pair(n, "de") for n in nums.test]
    assert small_splits.dev == [number_pair(n, "de") for n in nums.dev]
    assert small_splits.train == [number_pair(n, "de") for n in nums.train]
    # Disjoint by text too: what matters for leakage is the sentence the model sees.
    train_src = {p.source for p in small_splits.train}
    assert not train_src & {p.source for p in small_splits.dev}
    assert not train_src & {p.source for p in small_splits.test}


def test_number_splits_held_out_sizes_and_order() -> None:
    nums = number_splits(SMALL)
    per_digits = Counter(len(str(n)) for n in nums.test)
    # d=1: 9 eligible -> 1; d=2: 90 -> 9; d=3: 900 -> 90; then capped at 200 (test) / 100 (dev).
    assert per_digits == {1: 1, 2: 9, 3: 90, 4: 200, 5: 200, 6: 200}
    assert Counter(len(str(n)) for n in nums.dev) == {1: 1, 2: 9, 3: 90, 4: 100, 5: 100, 6: 100}
    # Ordered by digit count, then numerically.
    assert nums.test == sorted(nums.test)
    assert nums.dev == sorted(nums.dev)


def test_test_split_covers_every_digit_count(small_splits) -> None:
    groups = {p.group for p in small_splits.test}
    assert groups == {f"digits={d}" for d in range(1, 7)}
    assert small_splits.summary["groups"]["test"]["digits=1"] == 1


def test_zero_in_train_never_held_out(small_splits) -> None:
    zero = number_pair(0, "de")
    assert zero in small_splits.train
    assert zero not in small_splits.dev
    assert zero not in small_splits.test
    # Even when training is tiny and the draws happen to miss it.
    for seed in range(20):
        nums = number_splits(NumberCorpusConfig(train_size=1, max_digits=3, seed=seed))
        assert nums.train == [0]
        assert 0 not in nums.dev and 0 not in nums.test


def test_train_digit_counts_roughly_uniform() -> None:
    nums = number_splits(SMALL)
    counts = Counter(len(str(n)) for n in nums.train)
    expected = SMALL.train_size / SMALL.max_digits
    assert set(counts) == set(range(1, 7))
    for d, c in counts.items():
        assert 0.7 * expected <= c <= 1.3 * expected, (d, c)


def test_summary_is_json_and_complete(small_splits) -> None:
    import json

    summary = json.loads(json.dumps(small_splits.summary))
    assert summary["kind"] == "numbers"
    assert summary["lang"] == "de"
    assert summary["seed"] == 1
    assert summary["sizes"] == {"train": 2000, "dev": 400, "test": 700}
    assert summary["problems"] == 0
    assert sum(summary["groups"]["dev"].values()) == 400


@pytest.mark.parametrize("lang", ["fr", "es"])
def test_other_languages(lang: str) -> None:
    splits = number_corpus(NumberCorpusConfig(lang=lang, max_digits=3, train_size=200))
    assert splits.summary["lang"] == lang
    assert number_pair(0, lang) in splits.train
    assert all(p.target for p in splits.train + splits.dev + splits.test)


def test_supported_languages() -> None:
    assert {"de", "fr", "es"} <= set(SUPPORTED_LANGS)
    with pytest.raises(ValueError, match="supported: de, fr, es"):
        number_corpus(NumberCorpusConfig(lang="xx"))
    with pytest.raises(ValueError, match="supported"):
        number_pair(3, "en")


@pytest.mark.parametrize(
    "kwargs",
    [{"max_digits": 0}, {"train_size": 0}, {"dev_per_digits": 0}, {"test_per_digits": 0}],
)
def test_bad_config(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        number_splits(NumberCorpusConfig(**kwargs))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# User corpora
# ------------------------------------------------------------------------------------------


def _write_bad_tsv(path: Path) -> None:
    lines = [
        b"hello\thallo\n",  # 1 ok
        b"one\ttwo\tthree\n",  # 2 three columns
        b"good morning\t   \n",  # 3 empty target
        b"caf\xe9\tcafe\n",  # 4 latin-1, invalid UTF-8
        b"long\t" + b"x" * 30 + b"\n",  # 5 over max_chars=20
        b"   \n",  # 6 blank
        b"  thanks \t danke \r\n",  # 7 ok, stripped, CRLF
        b"no tab here\n",  # 8 one column
        b"bye\ttschuess",  # 9 ok, no final newline
    ]
    path.write_bytes(b"".join(lines))


BAD_LINES = [2, 3, 4, 5, 6, 8]


def test_read_tsv_fail_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.tsv"
    _write_bad_tsv(path)
    with pytest.raises(CorpusError) as info:
        read_tsv(path, max_chars=20)
    message = str(info.value)
    for line in BAD_LINES:
        assert f"{path}:{line}:" in message
    for line in (1, 7, 9):
        assert f"{path}:{line}:" not in message
    assert [p.line for p in info.value.problems] == BAD_LINES
    reasons = {p.line: p.reason for p in info.value.problems}
    assert "found 3" in reasons[2]
    assert "empty target" in reasons[3]
    assert "UTF-8" in reasons[4]
    assert "30" in reasons[5] and "20" in reasons[5]
    assert reasons[6] == "empty line"
    assert "found 1" in reasons[8]


def test_stray_carriage_returns_and_byte_order_marks_are_reported_by_line(
    tmp_path: Path,
) -> None:
    """A CR inside a line, a BOM in the middle of a file (files joined together) and old-Mac
    (CR-only) line endings each get a line-numbered report naming the character, instead of
    being kept inside sentences or reported as a column count."""
    path = tmp_path / "odd.tsv"
    path.write_bytes(
        b"hello\thallo\n"  # 1 ok
        b"good\rmorning\tguten morgen\n"  # 2 CR inside the source
        + "\ufeffthanks\tdanke\n".encode()  # 3 a BOM at a line start, mid-file
        + b"bye\ttsch\xc3\xbcss\r\n"  # 4 ok: CRLF
    )
    with pytest.raises(CorpusError) as info:
        read_tsv(path)
    reasons = {p.line: p.reason for p in info.value.problems}
    assert sorted(reasons) == [2, 3]
    assert reasons[2].startswith("carriage return inside the line (old Mac line endings?")
    assert reasons[3] == "source contains a byte-order mark (U+FEFF; files joined together?)"
    mac = tmp_path / "mac.tsv"
    mac.write_bytes(b"one\teins\rtwo\tzwei\rthree\tdrei\r")
    with pytest.raises(CorpusError) as info:
        read_tsv(mac)
    [problem] = info.value.problems
    assert problem.line == 1 and problem.reason.startswith("carriage return inside the line")
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_bytes(b"one\ntw\ro\n")
    tgt.write_bytes(b"eins\nzwei\n")
    with pytest.raises(CorpusError) as info:
        read_parallel(src, tgt)
    [problem] = info.value.problems
    assert (problem.path, problem.line) == (str(src), 2)
    assert problem.reason.startswith("source contains a carriage return")


def test_read_tsv_skip_returns_good_pairs_and_problems(tmp_path: Path) -> None:
    path = tmp_path / "bad.tsv"
    _write_bad_tsv(path)
    pairs, problems = read_tsv(path, max_chars=20, on_error="skip")
    assert pairs == [Pair("hello", "hallo"), Pair("thanks", "danke"), Pair("bye", "tschuess")]
    assert [p.line for p in problems] == BAD_LINES
    assert all(p.path == str(path) for p in problems)


def test_corpus_error_message_truncates_after_20() -> None:
    problems = [CorpusProblem("f.tsv", i, "empty line") for i in range(1, 26)]
    message = str(CorpusError(problems))
    assert "f.tsv:20: empty line" in message
    assert "f.tsv:21:" not in message
    assert "... and 5 more" in message
    assert str(problems[0]) == "f.tsv:1: empty line"


def test_write_tsv_round_trip(tmp_path: Path) -> None:
    pairs = [Pair("a b", "c d"), Pair("zéro", "null")]
    path = tmp_path / "sub" / "out.tsv"
    write_tsv(pairs, path)
    assert read_tsv(path) == (pairs, [])
    with pytest.raises(ValueError, match="TAB"):
        write_tsv([Pair("a\tb", "c")], tmp_path / "x.tsv")


def test_read_parallel(tmp_path: Path) -> None:
    src, tgt = tmp_path / "c.en", tmp_path / "c.de"
    src.write_text("one\ntwo\n\nfour\nfive\n", encoding="utf-8")
    tgt.write_text("eins\n\n\nvier\nfünf\n", encoding="utf-8")
    with pytest.raises(CorpusError) as info:
        read_parallel(src, tgt)
    assert [(p.path, p.line) for p in info.value.problems] == [(str(tgt), 2), (str(src), 3)]
    pairs, problems = read_parallel(src, tgt, on_error="skip")
    assert pairs == [Pair("one", "eins"), Pair("four", "vier"), Pair("five", "fünf")]
    assert len(problems) == 2


def test_read_parallel_line_count_mismatch_always_fatal(tmp_path: Path) -> None:
    src, tgt = tmp_path / "c.en", tmp_path / "c.de"
    src.write_text("one\ntwo\nthree\n", encoding="utf-8")
    tgt.write_text("eins\nzwei\n", encoding="utf-8")
    for mode in ("fail", "skip"):
        with pytest.raises(CorpusError) as info:
            read_parallel(src, tgt, on_error=mode)
        message = str(info.value)
        assert str(src) in message and str(tgt) in message
        assert "3 lines" in message and "2 lines" in message


def _write_corpus(path: Path, n: int) -> None:
    # Every source twice (as a paraphrase pair), so grouping by source is exercised.
    rows = [f"sentence {i}\tSatz {i}\n" for i in range(n)]
    rows += [f"sentence {i}\tder Satz {i}\n" for i in range(0, n, 2)]
    path.write_text("".join(rows), encoding="utf-8")


def test_user_corpus_auto_split_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    _write_corpus(path, 200)
    a = user_corpus(path, seed=3)
    assert a == user_corpus(path, seed=3)
    assert a.train != user_corpus(path, seed=4).train
    train_src = {p.source for p in a.train}
    dev_src, test_src = {p.source for p in a.dev}, {p.source for p in a.test}
    assert len(dev_src) == len(test_src) == 10  # 5% of 200 distinct sources
    assert not train_src & dev_src and not train_src & test_src and not dev_src & test_src
    # Nothing lost, nothing duplicated.
    assert sorted(map(repr, a.train + a.dev + a.test)) == sorted(map(repr, read_tsv(path)[0]))
    s = a.summary
    assert s["kind"] == "user"
    assert s["files"]["train"] == "train.tsv"
    assert s["auto_split"] == {"dev": True, "test": True}
    assert s["sizes"] == {"train": len(a.train), "dev": len(a.dev), "test": len(a.test)}
    assert s["sources_also_in_train"] == {"dev": 0, "test": 0}
    assert s["problems"] == 0


def test_user_corpus_minimum_sizes(tmp_path: Path) -> None:
    path = tmp_path / "t.tsv"
    path.write_text("a\tb\nc\td\n", encoding="utf-8")
    with pytest.raises(ValueError, match="at least 3"):
        user_corpus(path)
    path.write_text("a\tb\nc\td\ne\tf\n", encoding="utf-8")
    splits = user_corpus(path)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (1, 1, 1)


def test_user_corpus_given_splits_and_problems(tmp_path: Path) -> None:
    train = tmp_path / "train.tsv"
    _write_corpus(train, 20)
    dev_src, dev_tgt = tmp_path / "dev.en", tmp_path / "dev.de"
    dev_src.write_text("x\ny\n", encoding="utf-8")
    dev_tgt.write_text("X\n\n", encoding="utf-8")
    test = tmp_path / "test.tsv"
    test.write_text("sentence 1\tSatz 1\nbroken\n", encoding="utf-8")
    with pytest.raises(CorpusError) as info:
        user_corpus(train, (dev_src, dev_tgt), test)
    assert [str(p) for p in info.value.problems] == [
        f"{dev_tgt}:2: empty target",
        f"{test}:2: expected 2 tab-separated columns (source<TAB>target), found 1",
    ]
    splits = user_corpus(train, (dev_src, dev_tgt), test, on_error="skip")
    assert splits.dev == [Pair("x", "X")]
    assert splits.test == [Pair("sentence 1", "Satz 1")]
    assert len(splits.train) == 30  # given splits take nothing from training
    assert splits.summary["problems"] == 2
    assert splits.summary["files"]["dev"] == ["dev.en", "dev.de"]
    assert splits.summary["auto_split"] == {"dev": False, "test": False}
    assert splits.summary["sources_also_in_train"] == {"dev": 0, "test": 1}
