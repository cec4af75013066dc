"""Builds Hugging Face ``MarianMTModel`` directories locally, in the exact layout of an OPUS-MT
hub snapshot (``config.json``, ``generation_config.json``, ``model.safetensors``,
``source.spm``, ``target.spm``, ``vocab.json`` [``target_vocab.json``],
``tokenizer_config.json``), without downloading anything: the tests, ``make marian-demo`` and
the engine benchmark share it.

    python benchmarks/marian_dirs.py --out /tmp/opus-mt-demo --d-model 512 --layers 6 \\
        --heads 8 --ffn 2048 --vocab 32000 --train-steps 0

The weights are RANDOM (or trained for a few seconds on a synthetic word-for-word corpus, so
that greedy outputs depend on the input): such a model is for checking the import and the
serving path, never for translating.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORDS = tuple(
    """
    the a small big red green blue house tree river cat dog bird fish water stone light dark
    old new cold warm fast slow high low long short city road boat book hand door window night
    day sun moon star wind rain snow field hill
    """.split()  # noqa: SIM905 (a word list)
)


@dataclass(frozen=True)
class MarianSpec:
    """What to build; defaults are test-sized."""

    d_model: int = 32
    layers: int = 2
    heads: int = 4
    ffn: int = 64
    vocab: int = 160  # SentencePiece pieces per side (the vocabulary adds specials and codes)
    vocab_size: int = 0  # the model's vocabulary, padded with pieces no text produces (0: none)
    max_positions: int = 64
    activation: str = "swish"
    eos_first: bool = True  # eos = 0 (OPUS-MT); False puts <unk> first, so eos = 1
    separate_vocabs: bool = False
    languages: tuple[str, ...] = ()  # target-language codes, e.g. ("fra", "deu")
    train_steps: int = 60
    init_std: float = 0.1  # larger than Marian's 0.02: a random model then reads its input
    max_length: int = 40  # generation_config.json's max_length
    seed: int = 0
    extra_config: dict[str, Any] = field(default_factory=dict)


def synthetic_pairs(n: int, languages: tuple[str, ...], seed: int) -> list[tuple[str, str]]:
    """Sentences of random words and their "translations": every word reversed (and, per
    target language, suffixed differently), in reversed order; prefixed with the >>code<<."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(1, 6))
        lang = rng.choice(languages) if languages else ""
        target = " ".join(w[::-1] + lang[:1] for w in reversed(words))
        source = " ".join(words)
        out.append((f">>{lang}<< {source}" if lang else source, target))
    return out


def _train_spm(texts: list[str], prefix: Path, size: int) -> Path:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2, num_threads=1,
    )  # fmt: skip
    return prefix.with_suffix(".model")


def _vocab(spm_path: Path, spec: MarianSpec, codes: bool) -> dict[str, int]:
    """Marian's vocab.json: eos and unk, the language codes, every piece, <pad> last."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    first = ["</s>", "<unk>"] if spec.eos_first else ["<unk>", "</s>"]
    lang = [f">>{c}<<" for c in spec.languages] if codes else []
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    ordinary = [p for p in pieces if p not in ("<unk>", "<s>", "</s>")]
    # A synthetic corpus supports a few thousand pieces; a real OPUS-MT vocabulary has ~60k
    # entries (both sides' pieces), many of which one side's model never produces.
    filler = [f"▁unused{i}" for i in range(spec.vocab_size - len(first + lang + ordinary) - 1)]
    return {p: i for i, p in enumerate([*first, *lang, *ordinary, *filler, "<pad>"])}


def build(out: Path, spec: MarianSpec = MarianSpec(), log: bool = False) -> Path:
    """Writes a MarianMTModel directory (model and tokenizer, save_pretrained) into out."""
    import torch
    from transformers import GenerationConfig, MarianConfig, MarianMTModel, MarianTokenizer

    torch.manual_seed(spec.seed)
    out.mkdir(parents=True, exist_ok=True)
    pairs = synthetic_pairs(2000, spec.languages, spec.seed)
    with tempfile.TemporaryDirectory() as tmp:
        sources = [s.split("<< ", 1)[-1] for s, _ in pairs]
        src_spm = _train_spm(sources, Path(tmp) / "source", spec.vocab)
        tgt_texts = [t for _, t in pairs]
        tgt_spm = _train_spm(tgt_texts, Path(tmp) / "target", spec.vocab - 20)
        if not spec.separate_vocabs:  # one vocabulary over both sides, both .spm the same
            src_spm = tgt_spm = _train_spm(sources + tgt_texts, Path(tmp) / "joint", spec.vocab)
        vocab = _vocab(src_spm, spec, codes=True)
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        kwargs: dict[str, Any] = {}
        target_vocab = vocab
        if spec.separate_vocabs:
            target_vocab = _vocab(tgt_spm, spec, codes=False)
            (Path(tmp) / "target_vocab.json").write_text(json.dumps(target_vocab))
            kwargs = {"target_vocab_file": str(Path(tmp) / "target_vocab.json")}
        tok = MarianTokenizer(
            str(src_spm), str(tgt_spm), str(Path(tmp) / "vocab.json"),
            separate_vocabs=spec.separate_vocabs, **kwargs,
        )  # fmt: skip
        tok.save_pretrained(out)
    pad = len(target_vocab) - 1
    eos = target_vocab["</s>"]
    config = MarianConfig(
        vocab_size=len(vocab), decoder_vocab_size=len(target_vocab),
        share_encoder_decoder_embeddings=not spec.separate_vocabs,
        d_model=spec.d_model, encoder_layers=spec.layers, decoder_layers=spec.layers,
        encoder_attention_heads=spec.heads, decoder_attention_heads=spec.heads,
        encoder_ffn_dim=spec.ffn, decoder_ffn_dim=spec.ffn,
        max_position_embeddings=spec.max_positions, activation_function=spec.activation,
        scale_embedding=True, pad_token_id=pad, decoder_start_token_id=pad,
        eos_token_id=eos, forced_eos_token_id=eos, dropout=0.0, init_std=spec.init_std,
        **spec.extra_config,
    )  # fmt: skip
    model = MarianMTModel(config)
    with torch.no_grad():  # OPUS-MT's bias is nonzero; make ours so too, pad's included
        model.final_logits_bias.normal_(0.0, 0.5)
    _train(model, tok, pairs, spec, log)
    model.generation_config = GenerationConfig(
        bad_words_ids=[[pad]], decoder_start_token_id=pad, eos_token_id=eos,
        forced_eos_token_id=eos, pad_token_id=pad, max_length=spec.max_length, num_beams=4,
    )  # fmt: skip
    model.save_pretrained(out)
    return out


def _train(model: Any, tok: Any, pairs: list[tuple[str, str]], spec: MarianSpec, log: bool) -> None:
    """A few Adam steps on the synthetic pairs, so that outputs depend on the input."""
    import torch

    if spec.train_steps <= 0:
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # measured: several times faster than 2 at these sizes
    try:
        _steps(model, tok, pairs, spec, log)
    finally:
        torch.set_num_threads(threads)
    model.eval()


def _steps(model: Any, tok: Any, pairs: list[tuple[str, str]], spec: MarianSpec, log: bool) -> None:
    import torch

    rng = random.Random(spec.seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    t = time.monotonic()
    for step in range(spec.train_steps):
        batch = rng.sample(pairs, 16)
        enc = tok([s for s, _ in batch], text_target=[t for _, t in batch], padding=True,
                  return_tensors="pt")  # fmt: skip
        labels = enc["labels"].masked_fill(enc["labels"] == model.config.pad_token_id, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     labels=labels).loss  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.monotonic() - t:.1f}s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument(
        "--vocab", type=int, default=32000,
        help="the model's vocabulary (SentencePiece pieces up to 4000, the rest unused entries)",
    )  # fmt: skip
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--train-steps", type=int, default=0)
    p.add_argument(
        "--init-std", type=float, default=0.02,
        help="random weights' standard deviation (0.02: MarianConfig's, as OPUS-MT models carry)",
    )  # fmt: skip
    a = p.parse_args(argv)
    spec = MarianSpec(
        d_model=a.d_model, layers=a.layers, heads=a.heads, ffn=a.ffn,
        vocab=min(a.vocab, 4000), vocab_size=a.vocab,
        max_positions=a.max_positions, max_length=a.max_length, train_steps=a.train_steps,
        init_std=a.init_std,
    )  # fmt: skip
    build(Path(a.out), spec, log=True)
    print(f"wrote {a.out}: a MarianMTModel directory with RANDOM weights (not a translator)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
