"""Parallel corpora for training, dev and test: the built-in number corpus and user files.

Everything here is plain Python (no torch) so that corpus handling can be tested quickly and
reused by tools that never train. Every split is deterministic for a seed: the same inputs give
byte-identical splits, which is what makes a bundle's manifest reproducible.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from num2words import CONVERTER_CLASSES, num2words

__all__ = [
    "SOURCE_LANG",
    "SUPPORTED_LANGS",
    "CorpusError",
    "CorpusProblem",
    "CorpusSpec",
    "NumberCorpusConfig",
    "NumberSplits",
    "Pair",
    "PathLike",
    "Splits",
    "number_corpus",
    "number_pair",
    "number_splits",
    "read_parallel",
    "read_tsv",
    "user_corpus",
    "write_tsv",
]

PathLike = str | os.PathLike[str]
"""A file path as the CLI passes it: a string or a ``pathlib.Path``."""

CorpusSpec = PathLike | tuple[PathLike, PathLike]
"""A corpus file: a TSV path, or a ``(source_path, target_path)`` pair of line-aligned files."""

OnError = Literal["skip", "fail"]

SOURCE_LANG = "en"
"""The built-in corpus always translates *from* English number words."""

# Target languages we have looked at and whose num2words output is one unique string per number
# (no ambiguity that would make the task unlearnable). Filtered by what the installed num2words
# actually provides, so an older num2words simply offers fewer languages instead of failing later.
_CANDIDATE_LANGS = ("de", "fr", "es", "it", "nl", "pt")
SUPPORTED_LANGS: tuple[str, ...] = tuple(
    lang for lang in _CANDIDATE_LANGS if lang in CONVERTER_CLASSES
)

_MAX_DIGITS_LIMIT = 12
"""num2words and the rejection sampling below are fine far beyond this, but longer numbers make
sentences (and the model's sequence length) grow without teaching anything new."""

_MAX_LISTED_PROBLEMS = 20


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One source/target sentence pair.

    ``group`` lets evaluation report per-bucket scores (e.g. ``"digits=3"`` for the number
    corpus) so that a model failing only on long inputs is visible; it is ``""`` for user
    corpora, which have no natural buckets.
    """

    source: str
    target: str
    group: str = ""


@dataclass(frozen=True)
class Splits:
    """Train/dev/test pairs plus a JSON-serialisable ``summary`` for the bundle manifest.

    The summary travels with the exported model so that anyone looking at a bundle can tell
    what it was trained on (corpus kind, language or file names, seed, split sizes, per-group
    counts, how many malformed lines were skipped) without the training machine.
    """

    train: list[Pair]
    dev: list[Pair]
    test: list[Pair]
    summary: dict[str, Any]
    # Lines left out under on_error="skip", for the caller to report one by one.
    problems: list[CorpusProblem] = field(default_factory=list)


@dataclass(frozen=True)
class CorpusProblem:
    """A malformed line of a corpus file, 1-based so it matches what editors show."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class CorpusError(ValueError):
    """Corpus files are unusable; ``problems`` lists every bad line, not only the first.

    Reporting all problems at once spares users a fix-one-rerun-find-the-next loop on large
    files. The message lists the first 20 and counts the rest so it stays readable.
    """

    def __init__(self, problems: Sequence[CorpusProblem], message: str | None = None) -> None:
        self.problems: list[CorpusProblem] = list(problems)
        if message is None:
            message = f"{len(self.problems)} problem(s) in corpus files"
        lines = [message + (":" if self.problems else "")]
        lines += [f"  {p}" for p in self.problems[:_MAX_LISTED_PROBLEMS]]
        if len(self.problems) > _MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - _MAX_LISTED_PROBLEMS} more")
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Built-in number corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NumberCorpusConfig:
    """Settings of the built-in English → ``lang`` number-words corpus."""

    lang: str = "de"
    max_digits: int = 6
    train_size: int = 200_000
    dev_per_digits: int = 100
    test_per_digits: int = 200
    seed: int = 1


@dataclass(frozen=True)
class NumberSplits:
    """The numbers behind a number corpus, before they become words.

    Exposed so that tests (and curious users) can check disjointness on the numbers
    themselves rather than on their spellings.
    """

    train: list[int]
    dev: list[int]
    test: list[int]


def _check_lang(lang: str) -> None:
    if lang not in SUPPORTED_LANGS:
        raise ValueError(
            f"unsupported target language {lang!r}; supported: {', '.join(SUPPORTED_LANGS)}"
        )


def number_pair(n: int, lang: str) -> Pair:
    """English words for ``n`` → ``lang`` words for ``n``, grouped by digit count.

    >>> number_pair(321, "de")
    Pair(source='three hundred and twenty-one', target='dreihunderteinundzwanzig', group='digits=3')
    """
    _check_lang(lang)
    if n < 0:
        raise ValueError(f"number corpus covers non-negative numbers only, got {n}")
    return Pair(
        source=num2words(n, lang=SOURCE_LANG),
        target=num2words(n, lang=lang),
        group=f"digits={len(str(n))}",
    )


def _validate_config(cfg: NumberCorpusConfig) -> None:
    _check_lang(cfg.lang)
    if not 1 <= cfg.max_digits <= _MAX_DIGITS_LIMIT:
        raise ValueError(f"max_digits must be in 1..{_MAX_DIGITS_LIMIT}, got {cfg.max_digits}")
    if cfg.train_size < 1:
        raise ValueError(f"train_size must be at least 1, got {cfg.train_size}")
    # Zero held-out numbers would leave a digit count untested, which is exactly the
    # length-generalisation failure the per-digit test split is there to reveal.
    if cfg.dev_per_digits < 1 or cfg.test_per_digits < 1:
        raise ValueError(
            "dev_per_digits and test_per_digits must be at least 1, got "
            f"{cfg.dev_per_digits} and {cfg.test_per_digits}"
        )


def _digit_range(d: int) -> tuple[int, int]:
    """Half-open range of the numbers with ``d`` digits; ``d == 1`` includes 0."""
    return (0 if d == 1 else 10 ** (d - 1)), 10**d


def number_splits(cfg: NumberCorpusConfig) -> NumberSplits:
    """Draw the numbers of each split; see :func:`number_corpus` for the rules.

    Pools are never materialised (the 6-digit pool alone has 900,000 numbers): held-out numbers
    are sampled with ``Random.sample`` over a ``range`` and kept in a set, and training draws
    reject them.
    """
    _validate_config(cfg)
    rng = random.Random(cfg.seed)
    held_out: set[int] = set()
    dev: list[int] = []
    test: list[int] = []
    for d in range(1, cfg.max_digits + 1):
        lo, hi = _digit_range(d)
        # 0 is never eligible for holding out: see number_corpus.
        eligible = range(max(lo, 1), hi)
        tenth = max(1, len(eligible) // 10)
        k_test = min(cfg.test_per_digits, tenth)
        k_dev = min(cfg.dev_per_digits, tenth)
        # Both caps are at most a tenth of the pool (or 1 of the 9 one-digit numbers), so at
        # least 80% of every pool is left for training and rejection sampling stays cheap.
        drawn = rng.sample(eligible, k_test + k_dev)
        test_d, dev_d = sorted(drawn[:k_test]), sorted(drawn[k_test:])
        test += test_d
        dev += dev_d
        held_out.update(drawn)

    train: list[int] = []
    for _ in range(cfg.train_size):
        d = rng.randint(1, cfg.max_digits)
        lo, hi = _digit_range(d)
        while True:
            n = rng.randrange(lo, hi)
            if n not in held_out:
                break
        train.append(n)
    if 0 not in train:
        # Guarantee zero is seen even with a tiny train_size; replacing (not appending) keeps
        # train_size exact, and the replaced draw is the last one, so the rest is unchanged.
        train[-1] = 0
    return NumberSplits(train=train, dev=dev, test=test)


def _group_counts(pairs: Iterable[Pair]) -> dict[str, int]:
    counts = Counter(p.group for p in pairs)
    return dict(sorted(counts.items(), key=lambda kv: _group_sort_key(kv[0])))


def _group_sort_key(group: str) -> tuple[int, str]:
    # "digits=10" must sort after "digits=9".
    name, _, value = group.partition("=")
    return (int(value), name) if value.isdigit() else (-1, group)


def number_corpus(cfg: NumberCorpusConfig) -> Splits:
    """Build the built-in corpus: English number words → ``cfg.lang`` number words.

    Why these rules:

    * Deterministic: a private ``random.Random(cfg.seed)`` (never the global state), so the
      same config gives byte-identical splits.
    * Digit count ``d`` runs over ``1..max_digits``; its pool is ``[10**(d-1), 10**d)``, and
      ``0..9`` for ``d == 1``.
    * For every ``d``, ``min(test_per_digits, max(1, floor(0.1 * eligible)))`` test numbers and
      likewise for dev are held out; dev, test and training numbers are pairwise disjoint, and
      every digit count is tested, so length generalisation is measured, not guessed.
    * **0 is always in training and never held out**: its word ("zero", "null", "zéro", ...)
      appears in no other number's spelling, so a model could never infer it; testing on it
      would only measure luck.
    * Training pairs (``train_size`` of them) draw the digit count uniformly, then a number
      uniformly from that digit count's training pool. Repetition is intended: drawing
      uniformly from all numbers would make short numbers vanishingly rare (there are only
      ten 1-digit numbers but 900,000 6-digit ones) and the model would fail on them.
    * Dev/test list each held-out number once, ordered by digit count, then numerically.
    """
    numbers = number_splits(cfg)
    cache: dict[int, Pair] = {}

    def pair(n: int) -> Pair:
        # Short numbers repeat a lot in training; num2words is the slow part.
        p = cache.get(n)
        if p is None:
            p = cache[n] = number_pair(n, cfg.lang)
        return p

    train = [pair(n) for n in numbers.train]
    dev = [pair(n) for n in numbers.dev]
    test = [pair(n) for n in numbers.test]
    summary: dict[str, Any] = {
        "kind": "numbers",
        "source_lang": SOURCE_LANG,
        "lang": cfg.lang,
        "config": asdict(cfg),
        "seed": cfg.seed,
        "sizes": {"train": len(train), "dev": len(dev), "test": len(test)},
        "distinct_train_numbers": len(set(numbers.train)),
        "groups": {
            "train": _group_counts(train),
            "dev": _group_counts(dev),
            "test": _group_counts(test),
        },
        "problems": 0,
    }
    return Splits(train=train, dev=dev, test=test, summary=summary)


# --------------------------------------------------------------------------------------------
# User corpora
# --------------------------------------------------------------------------------------------


def _read_lines(path: PathLike) -> list[bytes]:
    """Raw lines without their terminator; a trailing newline does not start an extra line.

    Bytes, not text, so that one badly encoded line is reported with its number instead of
    failing the whole file on open.
    """
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM written by some editors
        data = data[3:]
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    """``(text, None)`` or ``(None, reason)`` for invalid UTF-8."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 at byte {exc.start} of the line"


_CR_HINT = "old Mac line endings? save the file with LF or CRLF line endings"


def _side_faults(side: str, text: str, max_chars: int) -> list[str]:
    """Why one side of a pair cannot be used (none: it can). A TAB inside a sentence is a
    fault because splits are saved as TSV (:func:`write_tsv`)."""
    faults = [f"empty {side}"] if not text else []
    if "\t" in text:
        faults.append(f"{side} contains a TAB character")
    if "\r" in text:
        faults.append(f"{side} contains a carriage return ({_CR_HINT})")
    if "\ufeff" in text:
        faults.append(f"{side} contains a byte-order mark (U+FEFF; files joined together?)")
    if len(text) > max_chars:
        faults.append(f"{side} is {len(text)} characters long, over the limit of {max_chars}")
    return faults


def _check_on_error(on_error: str) -> None:
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")


def _checked(
    pairs: list[Pair], problems: list[CorpusProblem], on_error: OnError, where: str
) -> tuple[list[Pair], list[CorpusProblem]]:
    if problems and on_error == "fail":
        raise CorpusError(problems, f"{len(problems)} malformed line(s) in {where}")
    return pairs, problems


def _tsv_line(name: str, lineno: int, raw: bytes, max_chars: int) -> Pair | CorpusProblem:
    """One ``source<TAB>target`` line as a pair, or the problem naming all its faults."""
    text, bad = _decode(raw)
    if text is None:
        return CorpusProblem(name, lineno, bad or "invalid UTF-8")
    if not text.strip():
        return CorpusProblem(name, lineno, "empty line")
    if "\r" in text.strip():  # before the columns: a CR-only file is one line of many columns
        return CorpusProblem(name, lineno, f"carriage return inside the line ({_CR_HINT})")
    columns = text.split("\t")
    if len(columns) != 2:
        return CorpusProblem(
            name,
            lineno,
            f"expected 2 tab-separated columns (source<TAB>target), found {len(columns)}",
        )
    source, target = columns[0].strip(), columns[1].strip()
    faults = _side_faults("source", source, max_chars) + _side_faults("target", target, max_chars)
    faults.sort(key=lambda f: not f.startswith("empty"))  # a missing side first: it is the fault
    return CorpusProblem(name, lineno, "; ".join(faults)) if faults else Pair(source, target)


def read_tsv(
    path: PathLike, *, max_chars: int = 1000, on_error: OnError = "fail"
) -> tuple[list[Pair], list[CorpusProblem]]:
    """Read ``source<TAB>target`` lines; returns the good pairs and the bad lines.

    Each bad line (wrong column count, empty side, invalid UTF-8, a side over ``max_chars``,
    a blank line) becomes one :class:`CorpusProblem` naming all its faults. With
    ``on_error="fail"`` the whole file is validated first and one :class:`CorpusError` lists
    every problem; with ``"skip"`` the bad lines are left out and returned so that the caller
    logs them: nothing is ever dropped silently. Each side is stripped of surrounding
    whitespace (including a Windows ``\\r``).
    """
    _check_on_error(on_error)
    pairs: list[Pair] = []
    problems: list[CorpusProblem] = []
    for lineno, raw in enumerate(_read_lines(path), start=1):
        got = _tsv_line(str(path), lineno, raw, max_chars)
        if isinstance(got, Pair):
            pairs.append(got)
        else:
            problems.append(got)
    return _checked(pairs, problems, on_error, str(path))


def _aligned_lines(source_path: PathLike, target_path: PathLike) -> list[tuple[bytes, bytes]]:
    """The two files' lines side by side; CorpusError when their counts differ."""
    src_name, tgt_name = str(source_path), str(target_path)
    src_lines, tgt_lines = _read_lines(source_path), _read_lines(target_path)
    if len(src_lines) == len(tgt_lines):
        return list(zip(src_lines, tgt_lines, strict=True))
    counts = f"{src_name} has {len(src_lines)} lines, {tgt_name} has {len(tgt_lines)} lines"
    longer = src_name if len(src_lines) > len(tgt_lines) else tgt_name
    first_unpaired = min(len(src_lines), len(tgt_lines)) + 1
    raise CorpusError(
        [CorpusProblem(longer, first_unpaired, f"line counts differ: {counts}")],
        f"parallel files are not line-aligned: {counts}",
    )


def _parallel_line(
    names: tuple[str, str], lineno: int, raws: tuple[bytes, bytes], max_chars: int
) -> Pair | list[CorpusProblem]:
    """Line lineno of both files as a pair, or the problems, each against the file at fault."""
    texts: list[str] = []
    problems: list[CorpusProblem] = []
    for name, raw in zip(names, raws, strict=True):
        text, bad = _decode(raw)
        if text is None:
            problems.append(CorpusProblem(name, lineno, bad or "invalid UTF-8"))
        texts.append((text or "").strip())
    if problems:
        return problems
    if not any(texts):
        return [CorpusProblem(names[0], lineno, f"empty line (also empty in {names[1]})")]
    for side, name, text in zip(("source", "target"), names, texts, strict=True):
        faults = _side_faults(side, text, max_chars)
        if faults:
            problems.append(CorpusProblem(name, lineno, "; ".join(faults)))
    return problems or Pair(texts[0], texts[1])


def read_parallel(
    source_path: PathLike,
    target_path: PathLike,
    *,
    max_chars: int = 1000,
    on_error: OnError = "fail",
) -> tuple[list[Pair], list[CorpusProblem]]:
    """Read two line-aligned files (line *i* of one translates line *i* of the other).

    Different line counts always raise :class:`CorpusError`, whatever ``on_error`` says: the
    alignment of every line after the first missing one is in doubt, so skipping cannot help.
    Per-line checks are those of :func:`read_tsv`, reported against the file at fault. A TAB
    inside a sentence is also a problem, because splits are saved as TSV (:func:`write_tsv`).
    """
    _check_on_error(on_error)
    names = (str(source_path), str(target_path))
    pairs: list[Pair] = []
    problems: list[CorpusProblem] = []
    for lineno, raws in enumerate(_aligned_lines(source_path, target_path), start=1):
        got = _parallel_line(names, lineno, raws, max_chars)
        if isinstance(got, Pair):
            pairs.append(got)
        else:
            problems += got
    return _checked(pairs, problems, on_error, " / ".join(names))


def _read_spec(
    spec: CorpusSpec, *, max_chars: int
) -> tuple[list[Pair], list[CorpusProblem], str | list[str]]:
    """Read one corpus spec in skip mode; also return its file name(s) for the summary."""
    if isinstance(spec, tuple):
        src, tgt = spec
        pairs, problems = read_parallel(src, tgt, max_chars=max_chars, on_error="skip")
        return pairs, problems, [Path(src).name, Path(tgt).name]
    pairs, problems = read_tsv(spec, max_chars=max_chars, on_error="skip")
    return pairs, problems, Path(spec).name


def write_tsv(pairs: Iterable[Pair], path: PathLike) -> None:
    """Write ``source<TAB>target`` lines (UTF-8, ``\\n``) that :func:`read_tsv` reads back.

    Used to save splits (e.g. the test split next to a bundle) so that evaluation can be
    repeated on exactly the same sentences. Refuses TABs and line breaks inside a sentence,
    which would silently corrupt the file.
    """
    lines: list[str] = []
    for i, pair in enumerate(pairs):
        for side, text in (("source", pair.source), ("target", pair.target)):
            if any(c in text for c in "\t\r\n"):
                raise ValueError(f"pair {i}: {side} contains a TAB or line break: {text!r}")
        lines.append(f"{pair.source}\t{pair.target}\n")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)


def user_corpus(
    train: CorpusSpec,
    dev: CorpusSpec | None = None,
    test: CorpusSpec | None = None,
    *,
    held_out_fraction: float = 0.05,
    seed: int = 1,
    max_chars: int = 1000,
    on_error: OnError = "fail",
) -> Splits:
    """Load user corpora; split dev/test off the training data where they are not given.

    Each spec is a TSV path or a ``(source_path, target_path)`` tuple. All files are validated
    before anything is raised, so that ``on_error="fail"`` reports the problems of every file
    in one :class:`CorpusError`.

    Automatic splits are deterministic for ``seed`` and work on *distinct sources*: all pairs
    sharing a source land in the same split, so a held-out source is never seen in training
    (a source repeated in train and test would measure memorisation, not translation). Each
    automatic split receives ``max(1, int(held_out_fraction * distinct_sources))`` sources;
    at least 3 pairs (and enough distinct sources for one per split) are required. Splits
    keep the order of the input file. Given dev/test files are used as they are; their
    overlap with training is only counted in the summary.
    """
    _check_on_error(on_error)
    if not 0.0 < held_out_fraction < 0.5:
        raise ValueError(f"held_out_fraction must be in (0, 0.5), got {held_out_fraction}")
    specs = {"train": train, "dev": dev, "test": test}
    read = {k: _read_spec(v, max_chars=max_chars) for k, v in specs.items() if v is not None}
    files = {split: read[split][2] if split in read else None for split in specs}
    problems = [problem for _, split_problems, _ in read.values() for problem in split_problems]
    if problems and on_error == "fail":
        raise CorpusError(problems)
    held: dict[str, list[Pair]] = {s: read[s][0] for s in ("dev", "test") if s in read}
    for split, pairs in held.items():
        if not pairs:
            raise CorpusError([], f"the {split} corpus {files[split]} has no usable pairs")
    train_pairs = read["train"][0]
    auto = [split for split in ("test", "dev") if split not in held]
    if auto:
        train_pairs, auto_held = _auto_split(train_pairs, auto, held_out_fraction, seed)
        held.update(auto_held)
    elif not train_pairs:
        raise CorpusError([], f"the training corpus {files['train']} has no usable pairs")
    train_sources = {p.source for p in train_pairs}
    summary: dict[str, Any] = {
        "kind": "user",
        "files": files,
        "auto_split": {"dev": "dev" in auto, "test": "test" in auto},
        "held_out_fraction": held_out_fraction if auto else None,
        "seed": seed,
        "max_chars": max_chars,
        "sizes": {"train": len(train_pairs), "dev": len(held["dev"]), "test": len(held["test"])},
        "sources_also_in_train": {
            split: sum(p.source in train_sources for p in held[split]) for split in ("dev", "test")
        },
        "problems": len(problems),
    }
    return Splits(train_pairs, held["dev"], held["test"], summary, problems)


def _auto_split(
    pairs: list[Pair], splits: list[str], fraction: float, seed: int
) -> tuple[list[Pair], dict[str, list[Pair]]]:
    """Assign distinct sources to ``splits`` (each a ``fraction``) and the rest to training."""
    if len(pairs) < 3:
        raise CorpusError(
            [], f"need at least 3 training pairs to split off dev/test, got {len(pairs)}"
        )
    # dict keeps first-occurrence order, so the shuffle input (and result) is deterministic.
    sources = list(dict.fromkeys(p.source for p in pairs))
    if len(sources) < len(splits) + 1:
        raise CorpusError(
            [],
            f"need at least {len(splits) + 1} distinct source sentences to split off "
            f"{' and '.join(splits)}, got {len(sources)}",
        )
    rng = random.Random(seed)
    order = list(range(len(sources)))
    rng.shuffle(order)
    k = max(1, int(fraction * len(sources)))
    assignment: dict[str, str] = {}
    start = 0
    for split in splits:
        for i in order[start : start + k]:
            assignment[sources[i]] = split
        start += k
    held: dict[str, list[Pair]] = {split: [] for split in splits}
    train: list[Pair] = []
    for p in pairs:
        target_split = assignment.get(p.source)
        (held[target_split] if target_split else train).append(p)
    # By construction no held-out source is in train; filter anyway so the guarantee does not
    # hinge on the assignment code above.
    train_sources = {p.source for p in train}
    held = {s: [p for p in ps if p.source not in train_sources] for s, ps in held.items()}
    return train, held
