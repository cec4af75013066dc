"""Training, export and verification through the real CLI on a tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from export.cli import main
from export.pipeline import ExportError
from service.bundle import BundleError, load_bundle

REPO = Path(__file__).resolve().parents[1]


def test_tiny_model_loss_falls(tiny_run: Path) -> None:
    log = [json.loads(line) for line in (tiny_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [60, 120]
    import torch

    ckpt = torch.load(tiny_run / "checkpoint_last.pt", weights_only=True)
    assert ckpt["step"] == 120
    # an untrained model's loss is about ln(vocab); after 120 steps it must be far below
    vocab = ckpt["model_config"]["vocab_size"]
    assert log[-1]["loss"] < 0.6 * np.log(vocab)
    assert log[-1]["loss"] < log[0]["loss"]
    assert set(log[-1]["exact_match_by_group"]) == {f"digits={d}" for d in range(1, 5)}


def test_resume_continues_from_last_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["train", "--run", str(run), "--resume", "--max-steps", "130", "--skip-test",
                 "--no-progress"]) == 0  # fmt: skip
    import torch

    assert torch.load(run / "checkpoint_last.pt", weights_only=True)["step"] == 130
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", "--run", str(run), "--max-steps", "1"])


def test_bundle_contents_and_verification(tiny_bundle: Path) -> None:
    manifest = load_bundle(tiny_bundle).manifest
    assert manifest["format_version"] == 1
    assert manifest["onnx"]["opset"] >= 17
    assert set(manifest["files"]) == {
        "tokenizer.model",
        "encoder.onnx",
        "decoder.onnx",
        "encoder.int8.onnx",
        "decoder.int8.onnx",
        "decoder_kv.onnx",
        "decoder_kv.int8.onnx",
        "encoder_packed.onnx",
        "encoder_packed.int8.onnx",
    }
    ver = manifest["verification"]
    assert ver["passed"] is True
    kv = ver["decoder_kv"]  # the in-place decoder, checked against PyTorch on its own
    assert kv["passed"] and kv["greedy_identical_share"] == 1.0 and kv["logits"] <= 1e-4
    assert kv["cross_attention"] <= 1e-5 and len(set(kv["past_lengths"])) == 4
    kv_graph = onnx.load(str(tiny_bundle / "decoder_kv.onnx"))
    assert sum(n.op_type == "GroupQueryAttention" for n in kv_graph.graph.node) == 2
    packed = ver["encoder_packed"]  # sentences packed end to end, each against itself alone
    assert packed["passed"] and packed["greedy_identical_share"] == 1.0
    assert packed["cross_kv"] <= 1e-4
    assert 0 in packed["source_lengths"] and len(set(packed["source_lengths"])) >= 5
    packed_graph = onnx.load(str(tiny_bundle / "encoder_packed.onnx"))
    assert [i.name for i in packed_graph.graph.input] == ["input_ids", "position_ids",
                                                          "segment_ids"]  # fmt: skip
    onnx.checker.check_model(str(tiny_bundle / "encoder_packed.onnx"), full_check=True)
    assert ver["max_abs_logit_diff"] <= 1e-4
    assert ver["greedy_identical_share"] == 1.0
    shapes = {(c["batch"], c.get("source_length")) for c in ver["grid"]}
    assert {(1, 1), (3, 7), (8, 24), (3, None)} <= shapes  # incl. the mixed-ages case
    mixed = next(c for c in ver["grid"] if "past_lengths" in c)
    assert len(set(mixed["past_lengths"])) == 3
    for precision in ("fp32", "int8"):
        m = manifest["metrics"][precision]
        assert {"exact_match", "bleu", "chrf"} <= set(m)
    assert manifest["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert manifest["corpus"]["kind"] == "numbers"
    for name in ("encoder.onnx", "decoder.onnx"):
        onnx.checker.check_model(str(tiny_bundle / name), full_check=True)
    dec = onnx.load(str(tiny_bundle / "decoder.onnx"))
    outputs = [o.name for o in dec.graph.output]
    assert "cross_attentions.0" in outputs and "cross_attentions.1" in outputs
    # The manifest records every graph's input and output names, as the graphs have them.
    for precision, graphs in manifest["onnx"]["graphs"].items():
        for part, name in graphs.items():
            g = onnx.load(str(tiny_bundle / name), load_external_data=False).graph
            recorded = manifest["onnx"]["io"][part]
            assert [i.name for i in g.input] == recorded["inputs"], (precision, part)
            assert [o.name for o in g.output] == recorded["outputs"], (precision, part)
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in dec.graph.input
    }
    assert dims["past_key_values.0.decoder.key"] == ["batch", 4, "past_length", 8]
    assert dims["past_key_values.1.encoder.value"] == ["batch", 4, "source_length", 8]


def test_verify_command(tiny_bundle: Path, tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", "--bundle", str(tiny_bundle), "--run", str(tiny_run)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["checkpoint_matches_manifest"]


def test_changed_byte_is_caught(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "decoder.onnx").write_bytes(bytes(data))
    (copy / "tokenizer.model").unlink()
    with pytest.raises(BundleError) as err:
        load_bundle(copy)
    assert "decoder.onnx: sha256 does not match manifest.json" in str(err.value)
    assert "tokenizer.model: missing" in str(err.value)  # every problem, at once


def test_export_refuses_to_overwrite(tiny_run: Path, tiny_bundle: Path) -> None:
    before = (tiny_bundle / "manifest.json").read_bytes()
    assert main(["export", "--run", str(tiny_run), "--out", str(tiny_bundle)]) == 1
    assert (tiny_bundle / "manifest.json").read_bytes() == before


def test_publish_swaps_bundles_whole_and_readable(tiny_bundle: Path, tmp_path: Path) -> None:
    """A replacement bundle goes in by rename with the old one set aside, is readable by other
    users, and a replacement that does not load leaves the old bundle as it was."""
    from export.pipeline import publish

    out = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_bundle, out)
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    before = sorted(p.name for p in out.iterdir())
    broken = tmp_path / "models" / ".work-broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "encoder.onnx").write_bytes(b"not the graph the manifest describes")
    with pytest.raises(BundleError):
        publish(broken, out, manifest, force=True)
    assert sorted(p.name for p in out.iterdir()) == before
    load_bundle(out)  # the old bundle, whole
    work = tmp_path / "models" / ".work"
    shutil.copytree(tiny_bundle, work)
    work.chmod(0o700)  # as mkdtemp makes it
    with pytest.raises(ExportError, match="appeared while exporting; --force to replace it"):
        publish(work, out, manifest, force=False)  # out was made while the export ran
    publish(work, out, {**manifest, "created": "replaced"}, force=True)
    assert json.loads((out / "manifest.json").read_text())["created"] == "replaced"
    assert out.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in out.parent.iterdir()) == [".work-broken", "tiny"]


def test_a_failed_move_in_keeps_the_old_bundle(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step between setting the old bundle aside and moving the new one in fails (a full
    or vanished disk): the old bundle is still whole at --out, nothing else is left beside it.
    Deleting the old bundle first would leave neither."""
    from export.pipeline import publish

    out = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_bundle, out)
    before = (out / "manifest.json").read_bytes()
    work = tmp_path / "models" / ".work"
    shutil.copytree(tiny_bundle, work)
    rename = Path.rename

    def failing(self: Path, target: Any) -> Any:
        if self == work:
            raise OSError(28, "No space left on device")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    manifest = {**json.loads(before), "created": "new"}
    with pytest.raises(OSError, match="No space left"):
        publish(work, out, manifest, force=True)
    assert (out / "manifest.json").read_bytes() == before
    load_bundle(out)  # whole: every checksum holds
    assert sorted(p.name for p in out.parent.iterdir()) == [".work", "tiny"]


@pytest.mark.parametrize("where", ["link", "file", "parent file", "failed file"])
def test_an_unusable_out_is_refused_before_any_work(
    where: str, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out that is a link, a file, under a file, or whose <out>.failed is a file (where a
    failed verification would put its report): refused up front naming it, not after the
    export with a traceback."""
    out = tmp_path / "models" / "tiny"
    if where == "parent file":
        out.parent.write_text("an operator's file")
    else:
        out.parent.mkdir()
    if where == "link":
        (tmp_path / "elsewhere").mkdir()
        out.symlink_to(tmp_path / "elsewhere")
    elif where == "file":
        out.write_text("an operator's file")
    elif where == "failed file":
        (out.parent / "tiny.failed").write_text("an operator's file")
    says = {
        "link": f"{out} is a symbolic link: give the directory itself",
        "file": f"{out} exists and is not a directory",
        "parent file": f"{out.parent} exists and is not a directory",
        "failed file": f"{out.parent / 'tiny.failed'} exists and is not a directory",
    }[where]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["export", "--run", str(tiny_run), "--out", str(out), "--force"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export:") and says in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_killed_exports_scratch_directory_is_removed_by_the_next(tmp_path: Path) -> None:
    """A scratch directory whose export process is gone (killed) is removed when the next
    export to the same place starts; one of a running process is left alone."""
    import os
    import subprocess

    from export.pipeline import scratch_dir

    out = tmp_path / "models" / "tiny"
    out.parent.mkdir()
    dead = subprocess.Popen(["true"])  # a pid that has exited
    dead.wait()
    orphan = out.parent / f".tiny.scratch-{dead.pid}-abc123"
    alive = out.parent / f".tiny.scratch-{os.getpid()}-def456"
    for d in (orphan, alive):
        d.mkdir()
        (d / "encoder.onnx").write_bytes(b"half written")
    with scratch_dir(out) as work:
        assert work.name.startswith(f".tiny.scratch-{os.getpid()}-")
        assert not orphan.exists() and alive.exists()
    assert not work.exists()


def test_a_bundle_set_aside_by_a_killed_export_is_put_back_or_removed(tmp_path: Path) -> None:
    """An export killed between setting the old bundle aside and moving the new one in left
    only `.<name>.old-<pid>`: the next export puts it back at --out; killed after the move
    (--out holds the new bundle), the set-aside copy is removed. A running export's is left."""
    import os
    import subprocess

    from export.pipeline import scratch_dir

    out = tmp_path / "models" / "tiny"
    out.parent.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    aside = out.parent / f".tiny.old-{dead.pid}"
    aside.mkdir()
    (aside / "manifest.json").write_text("old")
    running = out.parent / f".tiny.old-{os.getpid()}"
    running.mkdir()
    with scratch_dir(out):
        assert (out / "manifest.json").read_text() == "old" and not aside.exists()
        assert running.exists()
    aside.mkdir()
    with scratch_dir(out):
        assert not aside.exists() and (out / "manifest.json").read_text() == "old"


def test_a_failed_verification_writes_no_bundle(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runtime that feeds the decoder's cross keys in the wrong order (a bug in the served
    code): the export fails, nothing is written to --out, and the graphs and the report are
    left in <out>.failed."""
    from service.runtime import Runtime

    init = Runtime.__init__

    def swapped(self: Runtime, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.cross_names = self.cross_names[::-1]

    monkeypatch.setattr(Runtime, "__init__", swapped)
    out = tmp_path / "bundle"
    assert main(["export", "--run", str(tiny_run), "--out", str(out)]) == 1
    assert not out.exists()
    report = json.loads((tmp_path / "bundle.failed" / "verification.json").read_text())
    assert not report["passed"] and report["max_abs_logit_diff"] > 1e-2
    assert (tmp_path / "bundle.failed" / "decoder.onnx").is_file()


def test_evaluate_prints_sacrebleus_figures_of_its_translations(
    tiny_run: Path, tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`evaluate` prints and writes exact match, BLEU and chrF equal to sacreBLEU's, run here,
    on the translations it wrote (--samples) and the test split's references — BLEU with the
    char tokenizer, as the README says for the number corpus — and those translations are the
    model's: the bundle's fp32 engine decodes the same text."""
    import re

    import sacrebleu

    from export.tokenizer import Tokenizer
    from export.verify import engine_translate, served

    samples = tmp_path / "samples.tsv"
    assert main(["evaluate", "--run", str(tiny_run), "--samples", str(samples)]) == 0
    out = capsys.readouterr().out
    lines = samples.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "ok\tsource\treference\ttranslation"
    split = (tiny_run / "data" / "test.jsonl").read_text(encoding="utf-8")
    test = [json.loads(line) for line in split.splitlines()]
    rows = [line.split("\t") for line in lines[1:]]
    assert [(r[1], r[2]) for r in rows] == [(p["source"], p["target"]) for p in test]
    hyps, refs = [r[3] for r in rows], [p["target"] for p in test]
    bundle = load_bundle(tiny_bundle)
    tok = Tokenizer(tiny_bundle / "tokenizer.model")
    ids = engine_translate(served(bundle, "fp32"), bundle.limits,
                           tok.encode_batch([p["source"] for p in test]))  # fmt: skip
    assert hyps == [tok.decode(x) for x in ids]
    exact = [h == r for h, r in zip(hyps, refs, strict=True)]
    assert [r[0] for r in rows] == [str(int(e)) for e in exact]
    assert 0 < sum(exact) < len(exact), "a mix of right and wrong, or the figures show little"
    want = {
        "exact_match": 100 * sum(exact) / len(exact),
        "bleu": sacrebleu.corpus_bleu(hyps, [refs], tokenize="char").score,
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
    }
    printed = {
        "exact_match": re.search(r"^  exact match\s+([\d.]+) %$", out, re.M),
        "bleu": re.search(r"^  BLEU\s+([\d.]+)\s+\(sacreBLEU, tokenize=char\)$", out, re.M),
        "chrf": re.search(r"^  chrF\s+([\d.]+)$", out, re.M),
    }
    for key, match in printed.items():
        assert match is not None, (key, out)
        assert float(match.group(1)) == pytest.approx(want[key], abs=0.005), (key, out)
    metrics = json.loads((tiny_run / "metrics_test.json").read_text())
    assert metrics["sentences"] == len(test)
    assert 100 * metrics["exact_match"] == pytest.approx(want["exact_match"], abs=1e-9)
    assert metrics["bleu"] == pytest.approx(want["bleu"], abs=1e-9)
    assert metrics["chrf"] == pytest.approx(want["chrf"], abs=1e-9)


NO_TORCH_SCRIPT = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process")
sys.meta_path.insert(0, Block())
try:
    import torch  # noqa
    raise SystemExit("torch imported")
except ImportError:
    pass
import numpy as np, onnxruntime as ort, sentencepiece as spm
bundle = sys.argv[1]
m = json.load(open(f"{bundle}/manifest.json"))
enc = ort.InferenceSession(f"{bundle}/encoder.onnx", providers=["CPUExecutionProvider"])
dec = ort.InferenceSession(f"{bundle}/decoder.onnx", providers=["CPUExecutionProvider"])
sp = spm.SentencePieceProcessor(model_file=f"{bundle}/tokenizer.model")
ids = np.array([sp.encode("three hundred and twenty-one")], dtype=np.int64)
mask = np.ones_like(ids)
io = m["onnx"]["io"]
enc_kv = io["encoder"]["outputs"][1:]  # fetched and fed by name, as the service does
out = enc.run(enc_kv, {"input_ids": ids, "attention_mask": mask})
L, H = m["model"]["n_decoder_layers"], m["model"]["n_heads"]
dh = m["model"]["d_model"] // H
feeds = {"input_ids": np.array([[m["special_ids"]["bos"]]]), "position_ids": np.array([[0]]),
         "decoder_attention_mask": np.ones((1, 1), np.int64), "encoder_attention_mask": mask}
for i in range(L):
    for kv in ("key", "value"):
        feeds[f"past_key_values.{i}.decoder.{kv}"] = np.zeros((1, H, 0, dh), np.float32)
names = [n.replace("present.", "past_key_values.") for n in enc_kv]
feeds.update(zip(names, out))
res = dec.run(None, feeds)
assert res[0].shape == (1, 1, m["model"]["vocab_size"]), res[0].shape
assert "torch" not in sys.modules
print("ok", int(res[0].argmax()))
"""


def test_graphs_run_where_torch_cannot_be_imported(tiny_bundle: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, str(tiny_bundle)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok ")


def test_ctranslate2_conversion_gives_our_greedy_tokens(tiny_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    out = tmp_path / "ct2"
    assert main(["ct2", "--run", str(tiny_run), "--out", str(out)]) == 0
    from export.ct2 import greedy_agreement

    share, n = greedy_agreement(out, tiny_run / "checkpoint_best.pt", tiny_run)
    assert share == 1.0 and n > 0
    assert main(["ct2", "--run", str(tiny_run), "--out", str(out)]) == 1  # no overwrite


def test_train_on_a_user_tsv_reports_bad_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tsv = tmp_path / "corpus.tsv"
    good = [f"word {i}\tWort {i}" for i in range(60)]
    tsv.write_text("\n".join([*good[:10], "no tab here", *good[10:], "left\t"]) + "\n")
    args = ["--train", str(tsv), "--vocab-size", "60", "--d-model", "16", "--heads", "2",
            "--d-ff", "32", "--encoder-layers", "1", "--decoder-layers", "1", "--max-steps", "2",
            "--eval-every", "2", "--time-budget", "0", "--target-exact-match", "0",
            "--no-progress", "--skip-test"]  # fmt: skip
    with pytest.raises(SystemExit) as err:  # default: fail, naming every bad line
        main(["train", "--run", str(tmp_path / "fail"), *args])
    assert f"{tsv}:11:" in str(err.value) and f"{tsv}:62:" in str(err.value)
    with caplog.at_level("WARNING", logger="export"):
        assert main(["train", "--run", str(tmp_path / "skip"), *args, "--on-error", "skip"]) == 0
    skipped = [r.getMessage() for r in caplog.records if "skipped corpus line" in r.getMessage()]
    assert len(skipped) == 2 and f"{tsv}:11:" in skipped[0] and f"{tsv}:62:" in skipped[1]
    run = json.loads((tmp_path / "skip" / "run.json").read_text())
    assert run["corpus_summary"]["problems"] == 2 and run["bleu_tokenize"] == "13a"


def _checksummed(bundle: Path, name: str) -> None:
    """Fixes up the manifest's sha256 of a file edited on purpose."""
    from service.bundle import sha256_file

    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name]["sha256"] = sha256_file(bundle / name)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_external_data_and_links_outside_the_bundle_are_refused(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """Every byte served is checksummed: a graph whose weights sit in an external-data file the
    manifest does not list is refused when onnxruntime opens it, and a listed file that is a
    link to outside the bundle is refused by the validator (both were loaded before)."""
    from service.runtime import Runtime, RuntimeConfig

    external = tmp_path / "external"
    shutil.copytree(tiny_bundle, external)
    graph = onnx.load(str(external / "encoder.onnx"))
    onnx.save_model(graph, str(external / "encoder.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)  # fmt: skip
    _checksummed(external, "encoder.onnx")
    with pytest.raises(BundleError, match=r"encoder.onnx: onnxruntime cannot load it"):
        Runtime(load_bundle(external), RuntimeConfig("cpu", "fp32", 1))

    linked = tmp_path / "linked"
    shutil.copytree(tiny_bundle, linked)
    outside = tmp_path / "tokenizer-elsewhere.model"
    shutil.move(linked / "tokenizer.model", outside)
    (linked / "tokenizer.model").symlink_to(outside)
    with pytest.raises(BundleError, match=r"tokenizer.model: a link to .*, outside the bundle"):
        load_bundle(linked)
    inside = tmp_path / "inside"  # a link within the bundle (as volume mounts make) is fine
    shutil.copytree(tiny_bundle, inside)
    (inside / "data").mkdir()
    shutil.move(inside / "tokenizer.model", inside / "data" / "tokenizer.model")
    (inside / "tokenizer.model").symlink_to(Path("data") / "tokenizer.model")
    load_bundle(inside)


def _set(*path: str, value: Any = None, drop: bool = False) -> Any:
    """An edit of a manifest: the field at `path` set to `value`, or dropped."""

    def edit(manifest: dict[str, Any]) -> None:
        *parents, key = path
        for k in parents:
            manifest = manifest[k]
        if drop:
            del manifest[key]
        else:
            manifest[key] = value

    return edit


MALFORMED = {  # the edit, and what the refusal says
    "model a list": (_set("model", value=[]), "model is not a JSON object"),
    "files a list": (_set("files", value=[]), "files is not a JSON object"),
    "onnx a string": (_set("onnx", value="encoder.onnx"), "onnx is not a JSON object"),
    "tokenizer a list": (_set("tokenizer", value=[]), "tokenizer is not a JSON object"),
    "limits empty": (_set("limits", value={}), "limits.max_source_tokens must be an integer"),
    "max_target_tokens 1e9": (
        _set("limits", "max_target_tokens", value=10**9),
        "limits.max_target_tokens must be an integer from 1 to 32 (the model's positions)",
    ),
    "graphs a list": (_set("onnx", "graphs", value=[]), "onnx.graphs must map precisions"),
    "graphs missing": (_set("onnx", "graphs", drop=True), "onnx.graphs must map precisions"),
    "a precision's graphs a string": (
        _set("onnx", "graphs", "fp32", value="encoder.onnx"),
        "onnx.graphs.fp32 must map parts to file names",
    ),
    "tokenizer file missing": (
        _set("tokenizer", "file", drop=True),
        "tokenizer.file must name the SentencePiece model",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_manifest_is_refused_naming_the_field(
    case: str, tiny_bundle: Path, tmp_path: Path
) -> None:
    """Each was a traceback (or, for the length limit, a server allocating terabytes) when
    the service loaded the bundle; now one line names the field, before anything is loaded."""
    edit, says = MALFORMED[case]
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    edit(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as err:
        load_bundle(bad)
    assert f"manifest.json: {says}" in str(err.value)
