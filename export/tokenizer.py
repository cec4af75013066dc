"""SentencePiece tokenizer shared by training, export and the service.

The ``.model`` file written here is the only tokenizer artefact in a bundle: the service loads it
with plain ``sentencepiece`` (no torch), so the special ids are fixed in the model itself rather
than in code on either side.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "Tokenizer"]

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

_SPECIAL_NAMES = ("pad", "unk", "bos", "eos")
_EXPECTED_SPECIALS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}


class Tokenizer:
    """A loaded SentencePiece model with the project's fixed special ids (pad 0, unk 1, bos 2,
    eos 3).

    The ids are checked on load because the model, the exported graph and the service all
    hard-code them; a model trained elsewhere with other ids would decode garbage silently.
    """

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        self.model_path = Path(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        actual = {
            "pad": self._sp.pad_id(),
            "unk": self._sp.unk_id(),
            "bos": self._sp.bos_id(),
            "eos": self._sp.eos_id(),
        }
        if actual != _EXPECTED_SPECIALS:
            raise ValueError(
                f"{self.model_path}: special ids are {actual}, expected {_EXPECTED_SPECIALS}"
            )
        self._skip = frozenset((PAD_ID, BOS_ID, EOS_ID))

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        model_path: str | os.PathLike[str],
        *,
        vocab_size: int = 1000,
        model_type: str = "bpe",
        seed: int = 1,
        whitespace_suffix: bool = True,
    ) -> Tokenizer:
        """Train a model on ``sentences`` and write it to ``model_path``.

        Pass source *and* target sentences of the training split: one joint vocabulary lets
        the model share embeddings and copy pieces (names, digits) across languages.

        ``vocab_size`` is an upper bound (``hard_vocab_limit=False``): small corpora such as
        the number corpus cannot fill 1000 pieces, and failing would be worse than a smaller
        vocabulary; read the real size from :attr:`vocab_size`. Training is deterministic
        (same sentences and settings → byte-identical file): no input shuffling or sampling,
        one thread (multi-threaded EM sums floats in varying order), and a fixed seed.
        ``whitespace_suffix`` marks word ends ("sieben▁") rather than word starts ("▁sieben"):
        the last piece of a compound ("einhundert|sieben▁") is then the same piece as the word
        alone ("sieben▁"), so a word seen only inside compounds can still be produced alone.
        The default ``nmt_nfkc`` normalisation is kept, so :meth:`decode` returns the
        normalised text (e.g. runs of spaces collapsed).
        """
        items = list(sentences)
        if not items:
            raise ValueError("cannot train a tokenizer on zero sentences")
        longest = max(len(s.encode("utf-8")) for s in items)
        spm.set_random_generator_seed(seed)
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(items),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            hard_vocab_limit=False,
            character_coverage=1.0,
            normalization_rule_name="nmt_nfkc",
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            input_sentence_size=0,  # 0: every sentence, no sampling
            shuffle_input_sentence=False,
            # Sentences longer than this are dropped by the trainer, silently to us.
            max_sentence_length=max(4192, longest),
            num_threads=1,
            minloglevel=2,
            treat_whitespace_as_suffix=whitespace_suffix,
        )
        path = Path(model_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: a crash mid-write must not leave a truncated model that loads.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(path)
        return cls(path)

    @property
    def vocab_size(self) -> int:
        """Number of pieces actually in the model (may be below the requested size)."""
        return int(self._sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    def special_ids(self) -> dict[str, int]:
        """``{"pad": 0, "unk": 1, "bos": 2, "eos": 3}``, for the bundle manifest."""
        return {
            name: getattr(self, f"{name}_id")
            for name in _SPECIAL_NAMES  # keep the documented key order
        }

    def encode(self, text: str) -> list[int]:
        """Piece ids of ``text`` without bos/eos: the model code adds those where it needs."""
        return list(self._sp.encode(text, out_type=int))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Like :meth:`encode` for many texts in one call (sentencepiece batches in C++)."""
        return [list(ids) for ids in self._sp.encode(list(texts), out_type=int)]

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        size = self.vocab_size
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < size]
        if bad:
            raise ValueError(f"ids out of range 0..{size - 1}: {bad[:10]}")
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, ignoring pad/bos/eos wherever they occur.

        It does not stop at eos: truncating model output is the decoder's job, and silently
        cutting here would hide bugs there.
        """
        # strip(): with word-end markers the decoded text ends in the dummy space.
        text = str(self._sp.decode([i for i in self._check_ids(ids) if i not in self._skip]))
        return text.strip()

    def piece_id(self, piece: str) -> int:
        """The id of one piece (unk_id for an unknown piece)."""
        return int(self._sp.piece_to_id(piece))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The piece strings of ``ids`` (specials included), for debugging and attention plots."""
        return [str(self._sp.id_to_piece(i)) for i in self._check_ids(ids)]

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"
