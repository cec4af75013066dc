"""Tests of export/tokenizer.py on a small number corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.data import NumberCorpusConfig, Splits, number_corpus
from export.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer


@pytest.fixture(scope="module")
def corpus() -> Splits:
    return number_corpus(NumberCorpusConfig(lang="de", max_digits=6, train_size=2000, seed=1))


def _sentences(splits: Splits) -> list[str]:
    return [p.source for p in splits.train] + [p.target for p in splits.train]


@pytest.fixture(scope="module")
def tok(corpus: Splits, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "spm.model"
    return Tokenizer.train(_sentences(corpus), path, vocab_size=1000)


def test_special_ids(tok: Tokenizer) -> None:
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert tok.special_ids() == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.pieces([0, 1, 2, 3]) == ["<pad>", "<unk>", "<s>", "</s>"]


def test_vocab_size_is_real_size(tok: Tokenizer, tmp_path: Path) -> None:
    assert 4 < tok.vocab_size <= 1000
    assert tok.pieces([tok.vocab_size - 1])
    # A corpus too small to fill the vocabulary gives a smaller one (hard_vocab_limit=False).
    small = Tokenizer.train(["one two", "three four"], tmp_path / "small.model", vocab_size=1000)
    assert 4 < small.vocab_size < 1000
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_round_trip_test_split(tok: Tokenizer, corpus: Splits) -> None:
    texts = [p.source for p in corpus.test] + [p.target for p in corpus.test]
    batch = tok.encode_batch(texts)
    for text, ids in zip(texts, batch, strict=True):
        assert ids == tok.encode(text)
        assert UNK_ID not in ids and BOS_ID not in ids and EOS_ID not in ids
        assert tok.decode(ids) == text


def test_decode_ignores_specials(tok: Tokenizer) -> None:
    text = "three hundred and twenty-one"
    ids = tok.encode(text)
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == text
    # Does not stop at eos: content after it is still decoded.
    assert tok.decode([*ids, EOS_ID, *ids]) == f"{text} {text}"


def test_deterministic_model_bytes(corpus: Splits, tmp_path: Path, tok: Tokenizer) -> None:
    again = Tokenizer.train(_sentences(corpus), tmp_path / "again.model", vocab_size=1000)
    assert again.model_path.read_bytes() == tok.model_path.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_reload_from_path(tok: Tokenizer) -> None:
    loaded = Tokenizer(tok.model_path)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode("null") == tok.encode("null")


def test_bpe_and_empty_input(corpus: Splits, tmp_path: Path) -> None:
    bpe = Tokenizer.train(
        _sentences(corpus), tmp_path / "bpe.model", vocab_size=300, model_type="bpe"
    )
    assert bpe.special_ids() == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    target = corpus.test[-1].target
    assert bpe.decode(bpe.encode(target)) == target
    with pytest.raises(ValueError, match="zero sentences"):
        Tokenizer.train([], tmp_path / "empty.model")


def test_rejects_model_with_other_special_ids(tmp_path: Path) -> None:
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["one two three", "four five six"] * 20),
        model_writer=buffer,
        vocab_size=30,
        hard_vocab_limit=False,
        minloglevel=2,
    )  # default ids: unk 0, bos 1, eos 2, no pad
    path = tmp_path / "other.model"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="special ids"):
        Tokenizer(path)
