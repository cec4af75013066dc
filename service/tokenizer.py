"""Text ↔ token ids for a bundle, one class per tokenizer kind behind one small interface,
chosen once at load from the manifest (``tokenizer.type``):

- ``sentencepiece``: our own trainer's SentencePiece model; its ids are the model's ids.
- ``marian``: a Marian / OPUS-MT tokenizer, as transformers' ``MarianTokenizer`` tokenizes:
  the text is split on the special tokens (``</s>``, ``<unk>``, ``<pad>``: a literal one in the
  text becomes that token); a leading ``>>xxx<<`` target-language code of a part is kept as one
  token; the rest is cut into pieces by ``source.spm`` and the pieces are mapped to ids through
  ``vocab.json`` (not SentencePiece's own ids), unknown pieces to ``<unk>``; eos is appended.
  Decoding maps ids through the target vocabulary, drops the special tokens and joins the
  pieces. Only the ``sentencepiece`` package is used (never transformers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol

import sentencepiece as spm

from service.bundle import Bundle, BundleError

SPIECE_UNDERLINE = "▁"
_LANGUAGE_CODE = re.compile(r">>.+<<")


class TextTokenizer(Protocol):
    """What the translator needs of a tokenizer."""

    kind: str
    target_languages: list[str]  # ">>xxx<<" codes a request may choose (empty: none)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def source_pieces(self, ids: list[int]) -> list[str]: ...

    def target_pieces(self, ids: list[int]) -> list[str]: ...

    def all_pieces(self) -> list[str]:
        """Every piece either side may produce (bounds the size of an answer)."""
        ...


class SentencePieceTokenizer:
    """Our own trainer's tokenizer: one SentencePiece model, its ids are the model's."""

    kind = "sentencepiece"

    def __init__(self, model_file: Path) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.target_languages: list[str] = []

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.sp.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return str(self.sp.decode(ids)).strip() if ids else ""

    def source_pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]

    target_pieces = source_pieces

    def all_pieces(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]


class MarianTextTokenizer:
    """MarianTokenizer's rules over source.spm, target.spm, vocab.json [target_vocab.json]
    (see the module docstring); ``spec`` is the manifest's ``tokenizer``."""

    kind = "marian"

    def __init__(
        self, directory: Path, spec: dict[str, Any], sizes: tuple[int, int] | None = None
    ) -> None:
        """sizes: the model's source and target vocabularies, which every id must be below
        (else BundleError naming the file)."""
        files = spec["files"]
        self.source_spm = spm.SentencePieceProcessor(
            model_file=str(directory / files["source_spm"])
        )
        target = files.get("target_vocab")
        source_size, target_size = sizes or (1 << 62, 1 << 62)
        self.vocab: dict[str, int] = _load_vocab(directory, files["vocab"], source_size)
        self.target_vocab = _load_vocab(directory, target, target_size) if target else self.vocab
        missing = [spec[k] for k in ("eos_token", "unk_token") if spec[k] not in self.vocab]
        if missing:
            raise BundleError(directory, [f"{files['vocab']}: lacks {missing}"])
        # transformers decodes a shared vocabulary with source.spm, separate ones with target.spm
        self.decode_spm = (
            spm.SentencePieceProcessor(model_file=str(directory / files["target_spm"]))
            if target
            else self.source_spm
        )
        self.inverse = {i: p for p, i in self.target_vocab.items()}
        self.source_inverse = {i: p for p, i in self.vocab.items()}
        self.specials: list[str] = list(spec["special_tokens"])
        self.unk_id = self.vocab[spec["unk_token"]]
        self.eos_id = self.vocab[spec["eos_token"]]
        self.special_ids = {self.target_vocab[t] for t in self.specials if t in self.target_vocab}
        # longest first, as transformers' trie matches them
        alternatives = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        self.target_languages = (
            [] if target else [p for p in self.vocab if _LANGUAGE_CODE.fullmatch(p)]
        )

    def _pieces(self, text: str) -> list[str]:
        out: list[str] = []
        for part in self._split.split(text):
            if not part:
                continue
            if part in self.specials:
                out.append(part)
                continue
            if part.startswith(">>") and (end := part.find("<<")) != -1:
                out.append(part[: end + 2])
                part = part[end + 2 :]
            out += self.source_spm.encode(part, out_type=str)
        return out

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(p, self.unk_id) for p in self._pieces(text)] + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        pieces = [self.inverse[i] for i in ids if i not in self.special_ids and i in self.inverse]
        return str(self.decode_spm.decode_pieces(pieces)).replace(SPIECE_UNDERLINE, " ").strip()

    def source_pieces(self, ids: list[int]) -> list[str]:
        return [self.source_inverse.get(i, "") for i in ids]

    def target_pieces(self, ids: list[int]) -> list[str]:
        return [self.inverse.get(i, "") for i in ids]

    def all_pieces(self) -> list[str]:
        return [*self.vocab, *self.target_vocab]


def _load_vocab(directory: Path, name: str, size: int) -> dict[str, int]:
    """A vocab.json: piece → id, every id an integer below the model's vocabulary size."""
    try:
        data = json.loads((directory / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError included
        raise BundleError(directory, [f"{name}: not a readable JSON file ({e})"]) from e
    if not isinstance(data, dict):
        raise BundleError(directory, [f"{name}: not a JSON object of piece → id"])
    bad = [k for k, v in data.items() if type(v) is not int or not 0 <= v < size]
    if bad:
        shown = ", ".join(repr(k) for k in bad[:5]) + (
            f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        )
        raise BundleError(directory, [f"{name}: ids must be integers below {size}: {shown}"])
    return {str(k): v for k, v in data.items()}


def load_tokenizer(bundle: Bundle) -> TextTokenizer:
    """The bundle's tokenizer, by the manifest's ``tokenizer.type``."""
    spec = bundle.manifest["tokenizer"]
    if spec.get("type", "sentencepiece") == "marian":
        sizes = (int(bundle.model["vocab_size"]), bundle.target_vocab_size)
        tok = MarianTextTokenizer(bundle.directory, spec, sizes)
        if tok.eos_id != int(bundle.model["eos_id"]):
            problem = f"tokenizer.eos_token is id {tok.eos_id}, the model's eos_id is "
            raise BundleError(bundle.directory, [problem + str(bundle.model["eos_id"])])
        return tok
    return SentencePieceTokenizer(bundle.tokenizer_path)
