"""Marian / OPUS-MT import (issue 15): MarianMTModel directories built here (nothing is
downloaded), imported through the CLI, served over gRPC on 127.0.0.1, and compared with
transformers' own generate() and MarianTokenizer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from benchmarks.marian_dirs import MarianSpec, build
from export.cli import main as export_main
from service.bundle import load_bundle
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc
from service.tokenizer import MarianTextTokenizer, load_tokenizer
from tests.conftest import ServerThread
from tests.test_service import bad_request

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "the small cat",
    "a big red house by the river",
    "night day sun",
    "fish water stone",
    "old city road boat",
    "green tree",
]
# multilingual, shared vocabulary, eos 0, swish; separate vocabularies, eos 1, gelu
SPECS = {
    "multi": MarianSpec(languages=("fra", "deu")),
    "separate": MarianSpec(separate_vocabs=True, eos_first=False, activation="gelu", seed=1),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("marian")
    return {name: build(root / name, spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def bundles(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("marian-bundles")
    out = {}
    for name, d in dirs.items():
        out[name] = root / name
        assert export_main(["import-marian", str(d), "--out", str(out[name]), "--int8"]) == 0
    return out


def generate(d: Path, texts: list[str], max_lengths: list[int]) -> list[list[int]]:
    """transformers' greedy output ids (no start token, no eos) for each text, alone."""
    model = transformers.MarianMTModel.from_pretrained(str(d)).eval()
    tok = transformers.MarianTokenizer.from_pretrained(str(d))
    eos = model.config.eos_token_id
    out = []
    for text, n in zip(texts, max_lengths, strict=True):
        enc = tok([text], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, num_beams=1, do_sample=False, max_length=n)[0, 1:]
        row = ids.tolist()
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


@pytest.fixture(scope="module")
def served(bundles: dict[str, Path]) -> Iterator[dict[str, pb_grpc.TranslatorStub]]:
    servers = {name: ServerThread(b, metrics_port=0, lanes=1) for name, b in bundles.items()}
    channels = []
    try:
        stubs = {}
        for name, srv in servers.items():
            srv.wait_serving()
            channels.append(grpc.insecure_channel(srv.target))
            stubs[name] = pb_grpc.TranslatorStub(channels[-1])
        yield stubs
    finally:
        for c in channels:
            c.close()
        for srv in servers.values():
            srv.stop()


@pytest.mark.parametrize(
    "name,language", [("multi", "fra"), ("multi", ">>deu<<"), ("separate", "")]
)
def test_served_translations_equal_transformers_generate(
    name: str, language: str, served: dict[str, Any], bundles: dict[str, Path],
    dirs: dict[str, Path],
) -> None:  # fmt: skip
    options = pb.TranslateOptions(
        target_language=language, attention=pb.ATTENTION_LAYER_AVERAGE, return_alignment=True
    )
    res = served[name].Translate(pb.TranslateRequest(sentences=SENTENCES, options=options))
    bundle = load_bundle(bundles[name])
    tok = load_tokenizer(bundle)
    code = f">>{language.strip('<>')}<< " if language else ""
    texts = [code + s for s in SENTENCES]
    limits = [bundle.limits.target_limit(len(tok.encode(t))) for t in texts]
    forced = bundle.generation["forced_eos"]
    want = generate(dirs[name], texts, [n + 1 + forced for n in limits])
    got = [list(r.token_ids) for r in res.results]
    assert got == want
    assert len({tuple(w) for w in want}) >= 3, "the model's outputs must depend on its input"
    hf_tok = transformers.MarianTokenizer.from_pretrained(str(dirs[name]))
    assert [r.translation for r in res.results] == hf_tok.batch_decode(
        want, skip_special_tokens=True
    )
    for r in res.results:
        t, s = r.attention.shape
        rows = np.array(r.attention.values, np.float32).reshape(t, s)
        np.testing.assert_allclose(rows.sum(-1), np.ones(t), atol=1e-5)
        assert len(r.alignment) == len(r.token_ids) and r.alignment_pharaoh


def test_target_languages_differ_and_model_info(served: dict[str, Any]) -> None:
    stub = served["multi"]
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (list(info.target_languages), info.tokenizer) == (["fra", "deu"], "marian")
    fra, deu = (
        stub.Translate(
            pb.TranslateRequest(
                sentences=SENTENCES, options=pb.TranslateOptions(target_language=lang)
            )
        )
        for lang in ("fra", "deu")
    )
    assert [r.token_ids for r in fra.results] != [r.token_ids for r in deu.results]
    assert served["separate"].GetModelInfo(pb.GetModelInfoRequest()).target_languages == []


@pytest.mark.parametrize(
    "name,language,says",
    [("multi", "xyz", "unknown target language 'xyz'"), ("separate", "fra", "no target-language")],
)
def test_bad_target_language_is_invalid_argument(
    name: str, language: str, says: str, served: dict[str, Any]
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        served[name].Translate(
            pb.TranslateRequest(
                sentences=["the cat"], options=pb.TranslateOptions(target_language=language)
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = bad_request(e.value)
    assert field == "options.target_language" and says in description


EDGE_CASES = [
    "",
    ">>fra<< the small cat",
    ">>fra<<the cat",
    ">>zzz<< the cat",
    " >>fra<< leading space",
    "the cat >>fra<<",
    "unknown ☃ ✓ 𝔘 characters",
    "a literal </s> and <unk> and <pad> inside",
    "</s>",
    ("the small cat sat on the old stone " * 30)[:1000],
    "Mixed: Ωμέγα 漢字 مرحبا Привет the cat",
    "  spaces\tand\nnewlines  ",
]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_tokenizer_ids_equal_marian_tokenizer(name: str, bundles: dict[str, Path],
                                              dirs: dict[str, Path]) -> None:  # fmt: skip
    ours = load_tokenizer(load_bundle(bundles[name]))
    assert isinstance(ours, MarianTextTokenizer)
    hf = transformers.MarianTokenizer.from_pretrained(str(dirs[name]))
    for text in EDGE_CASES:
        assert ours.encode(text) == hf(text)["input_ids"], text
    assert ours.encode("a </s> b")[1] == ours.eos_id  # a literal </s> is the eos token


def test_manifest_records_the_verification_and_generation(bundles: dict[str, Path]) -> None:
    m = load_bundle(bundles["multi"]).manifest
    ver = m["verification"]
    assert ver["passed"] and ver["max_abs_logit_diff"] <= 1e-4
    assert ver["greedy_identical_share"] == 1.0 and ver["tokenizer"]["mismatches"] == []
    assert ver["decoder_kv"]["passed"] and ver["encoder_packed"]["passed"]
    pad = m["model"]["vocab_size"] - 1
    assert m["generation"]["suppressed_ids"] == [pad] and m["generation"]["decoder_start_id"] == pad
    assert m["tokenizer"]["type"] == "marian" and "vocab.json" in m["files"]
    assert m["model"]["positions"] == "halves" and m["model"]["activation"] == "swish"
    sep = load_bundle(bundles["separate"]).manifest
    assert sep["model"]["eos_id"] == 1 and sep["model"]["share_embeddings"] is False
    assert "target_vocab.json" in sep["files"]


def _edited_bundle(src: Path, dst: Path, vocab: dict[str, Any] | None = None,
                   limits: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """A copy of a bundle with vocab.json entries or limits changed, its checksums fixed up,
    so that only the edited field is wrong."""
    from service.bundle import sha256_file

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    if vocab:
        _edit_json(dst / "vocab.json", **vocab)
        manifest["files"]["vocab.json"]["sha256"] = sha256_file(dst / "vocab.json")
    manifest["limits"].update(limits or {})
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize(
    ("vocab", "limits", "says"),
    [
        ({"▁the": 10**6}, None, "vocab.json: ids must be integers below 162: '▁the'"),
        ({"▁the": -5}, None, "vocab.json: ids must be integers below 162: '▁the'"),
        (None, {"max_target_tokens": 10**9}, "limits.max_target_tokens must be an integer from 1"),
        (None, {"target_tokens_a": float("nan")}, "limits.target_tokens_a must be a number"),
    ],
)
def test_a_hand_edited_bundle_is_refused_naming_the_field(
    vocab: dict[str, Any] | None, limits: dict[str, Any] | None, says: str,
    bundles: dict[str, Path], tmp_path: Path,
) -> None:  # fmt: skip
    """Found by the hostile review: out-of-range vocabulary ids served (INTERNAL on every call,
    or silently wrong ids), and a huge output limit made the server allocate terabytes."""
    from service.bundle import BundleError

    b = _edited_bundle(bundles["multi"], tmp_path / "b", vocab, limits)
    with pytest.raises(BundleError) as e:
        load_tokenizer(load_bundle(b))
    assert says in str(e.value)


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


BAD = {
    "missing vocab": (lambda d: (d / "vocab.json").unlink(), "vocab.json: missing"),
    "corrupt weights": (
        lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage"),
        "model.safetensors: transformers cannot load it",
    ),
    "not marian": (lambda d: _edit_json(d / "config.json", model_type="bart"), "not a Marian"),
    "pre-norm": (
        lambda d: _edit_json(d / "config.json", normalize_before=True),
        "config.json: normalize_before is True",
    ),
    "activation": (
        lambda d: _edit_json(d / "config.json", activation_function="mish"),
        "activation_function 'mish'",
    ),
    "vocabulary size": (
        lambda d: _edit_json(d / "vocab.json", **{"▁extra": 10_000}),
        "vocab.json: 163 entries",
    ),
    "broken json": (lambda d: (d / "config.json").write_text("{"), "config.json: not valid JSON"),
    # found by the hostile review: each was imported, or ended in a traceback
    "generation eos list": (
        lambda d: _edit_json(d / "generation_config.json", eos_token_id=[0, 65]),
        "generation_config.json: eos_token_id [0, 65] is not config.json's single eos 0",
    ),
    "generation max_length 0": (
        lambda d: _edit_json(d / "generation_config.json", max_length=0),
        "generation_config.json: max_length 0 is not an integer ≥ 3",
    ),
    "generation broken json": (
        lambda d: (d / "generation_config.json").write_text("{nope"),
        "generation_config.json: not valid JSON",
    ),
    "huge layers": (
        lambda d: _edit_json(d / "config.json", encoder_layers=10**9),
        "config.json: encoder_layers is 1000000000; it must be an integer from 1 to 256",
    ),
    "nan weights": (lambda d: _spoil_weights(d, nan="final_logits_bias"), "not finite"),
    "no logits bias": (lambda d: _spoil_weights(d, drop="final_logits_bias"), "final_logits_bias"),
    "extra weights": (
        lambda d: _spoil_weights(d, add="model.encoder.layernorm_embedding.weight"),
        "weights MarianMTModel does not use",
    ),
}


def _spoil_weights(d: Path, nan: str = "", drop: str = "", add: str = "") -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(d / "model.safetensors"))
    if nan:
        weights[nan][..., 0] = float("nan")
    weights.pop(drop, None)
    if add:
        weights[add] = torch.ones(4)
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("where", ["source", "inside source", "file", "parent file", "failed file"])
def test_an_unusable_out_is_refused_before_any_work(
    where: str, dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out that would delete the input, or that cannot take a bundle: refused up front,
    the input left as it was."""
    d = tmp_path / "dir"
    shutil.copytree(dirs["multi"], d)
    out = {"source": d, "inside source": d / "bundle"}.get(where, tmp_path / "out" / "bundle")
    if where == "file":
        out = tmp_path / "bundle-file"
        out.write_text("an operator's file")
    elif where == "parent file":
        (tmp_path / "out").write_text("an operator's file")
    elif where == "failed file":
        out.parent.mkdir()
        (out.parent / "bundle.failed").write_text("an operator's file")
    before = sorted(p.name for p in d.iterdir())
    assert export_main(["import-marian", str(d), "--out", str(out), "--force"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot import:") and "Traceback" not in err, err
    assert sorted(p.name for p in d.iterdir()) == before


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_1_naming_the_file_and_writes_nothing(
    case: str, dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "dir"
    shutil.copytree(dirs["multi"], d)
    spoil, says = BAD[case]
    spoil(d)
    out = tmp_path / "bundle"
    assert export_main(["import-marian", str(d), "--out", str(out)]) == 1
    assert says in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".bundle.*"))
