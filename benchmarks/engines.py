"""Engine benchmark: the same weights and inputs in PyTorch, our onnxruntime decoding and
CTranslate2, greedy, with every row forced to exactly --tokens output tokens.

    python benchmarks/engines.py --model default --run runs/default      # or: make bench-engines
    python benchmarks/engines.py --model base                           # d512, 6+6, 8 heads, 32k
    python benchmarks/engines.py --model marian-base --rounds 3         # an OPUS-MT-shaped model

Engines: torch-nocache (eager, the decoder re-run over the whole prefix every step),
torch-cache (eager, KV cache), ort-fp32 / ort-int8 (service.engine over the exported graphs,
with offline decoding's settings: the decoder's idle intra-op threads spin between steps, as
CTranslate2's OpenMP threads do by default; --ort-spin off measures the server's setting),
ct2-fp32 / ct2-int8 (CTranslate2, converted by export.ct2). Each engine and batch size runs in
its own process (two engines in one process disturb each other), engines are interleaved, and
every engine's tokens are checked against torch-cache before its time counts.

Marian models (marian-small: d256, 3+3, vocab 8k; marian-base: d512, 6+6, vocab 32k; RANDOM
weights, built by benchmarks/marian_dirs.py): one MarianMTModel directory, imported by us
(`python -m export import-marian`, with its verification) and converted by CTranslate2's own
TransformersConverter (its route, not ours); the reference is hf-generate (transformers'
generate, greedy, eager PyTorch), and our decoding starts from the decoder start token with pad
suppressed, as transformers does.

--rounds N repeats every engine and batch size N times, interleaved (round 1 of every cell,
then round 2, ...): a single run's ratio moves by up to 2x on this shared machine. Reported:
generated tokens/s (best of --repeats within a run) per round, and per cell the median over
rounds with its min-max, the median of the per-round ratios to ct2-fp32 (and of int8 engines
to ct2-int8) with min-max, and the share of the machine's fp32 peak (--peak-gflops, 156.5 for
this 2-core Zen 3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bundles import SIZES  # noqa: E402

ENGINES = ("torch-nocache", "torch-cache", "ort-fp32", "ort-int8", "ct2-fp32", "ct2-int8")
MARIAN_ENGINES = ("hf-generate", "ort-fp32", "ort-int8", "ct2-fp32", "ct2-int8")
# OPUS-MT-shaped models (random weights), as in ANCHORS.md's table of the peers.
MARIAN: dict[str, dict[str, Any]] = {
    "marian-small": {"d_model": 256, "layers": 3, "heads": 4, "ffn": 1024, "vocab_size": 8000},
    "marian-base": {"d_model": 512, "layers": 6, "heads": 8, "ffn": 2048, "vocab_size": 32000},
}
SHOWN = ("vocab_size", "d_model", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers")


def inputs(low: int, high: int, batch: int, src_len: int, seed: int, eos: int | None = None
           ) -> list[list[int]]:  # fmt: skip
    """Random source ids in [low, high); with eos, src_len - 1 of them and eos last."""
    import random

    rng = random.Random(seed)
    n = src_len - (eos is not None)
    return [[rng.randrange(low, high) for _ in range(n)] + ([] if eos is None else [eos])
            for _ in range(batch)]  # fmt: skip


def sources(prep: dict[str, Any], batch: int, src_len: int) -> list[list[int]]:
    cfg = prep["cfg"]
    if prep.get("kind") == "marian":  # ordinary pieces (not eos/unk, not pad), eos appended
        return inputs(2, cfg["pad_id"], batch, src_len, seed=batch, eos=cfg["eos_id"])
    return inputs(4, cfg["vocab_size"], batch, src_len, seed=batch)


# ----------------------------------------------------------------------------- preparation


def prepare(model_name: str, run: str | None, work: Path) -> dict[str, Any]:
    """Checkpoint, ONNX bundle (fp32 + int8) and CTranslate2 models of the same weights."""
    import torch

    from benchmarks.bundles import random_model, write_bundle
    from export.checkpoint import model_from_checkpoint
    from export.ct2 import build_spec

    if model_name in MARIAN:
        return prepare_marian(model_name, work)
    if model_name == "default":
        ckpt = Path(run or "runs/default") / "checkpoint_best.pt"
        model, _ = model_from_checkpoint(ckpt)
    else:
        model = random_model(model_name, vocab_size=32000)
        ckpt = work / "checkpoint.pt"
        torch.save({"model_config": model.cfg.to_dict(), "model": model.state_dict()}, ckpt)
    cfg = model.cfg
    bundle = write_bundle(model, work / "bundle", int8=True)  # token ids in, no tokenizer

    class Pieces:  # the converter needs a vocabulary; ids are what the benchmark uses
        vocab_size = cfg.vocab_size

        @staticmethod
        def pieces(ids: list[int]) -> list[str]:
            special = {0: "<pad>", 1: "<unk>", 2: "<s>", 3: "</s>"}
            return [special.get(i, f"p{i}") for i in ids]

    spec = build_spec(model, Pieces())  # type: ignore[arg-type]
    (work / "ct2").mkdir(exist_ok=True)
    spec.save(str(work / "ct2"))  # fp32 weights; ct2-int8 loads them with compute_type=int8
    pieces = ["<pad>", "<unk>", "<s>", "</s>"] + [f"p{i}" for i in range(4, cfg.vocab_size)]
    return {"checkpoint": str(ckpt), "bundle": str(bundle), "work": str(work),
            "cfg": cfg.to_dict(), "pieces": pieces}  # fmt: skip


def prepare_marian(model_name: str, work: Path) -> dict[str, Any]:
    """One MarianMTModel directory (random weights); our import of it (verified against
    transformers, fp32 + int8) and CTranslate2's TransformersConverter's conversion."""
    from ctranslate2.converters import TransformersConverter

    from benchmarks.marian_dirs import MarianSpec, build
    from service.bundle import load_bundle

    shape = MARIAN[model_name]
    spec = MarianSpec(**shape, vocab=min(4000, shape["vocab_size"]), max_positions=512,
                      max_length=512, train_steps=0, init_std=0.02)  # fmt: skip
    directory = build(work / "marian", spec)
    subprocess.run([sys.executable, "-m", "export", "import-marian", str(directory), "--out",
                    str(work / "bundle"), "--int8"], check=True, cwd=REPO)  # fmt: skip
    TransformersConverter(str(directory)).convert(str(work / "ct2"))
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    pieces = sorted(vocab, key=vocab.__getitem__)
    cfg = load_bundle(work / "bundle").model
    return {"kind": "marian", "dir": str(directory), "bundle": str(work / "bundle"),
            "work": str(work), "cfg": cfg, "pieces": pieces}  # fmt: skip


# ----------------------------------------------------------------------------- workers


Decode = Callable[[], list[list[int]]]


def torch_decoder(engine: str, prep: dict[str, Any], src: list[list[int]], tokens: int) -> Decode:
    """Our PyTorch model, eager: with the KV cache, or re-running the whole prefix."""
    import torch

    from export.checkpoint import model_from_checkpoint

    cfg, batch = prep["cfg"], len(src)
    model, _ = model_from_checkpoint(Path(prep["checkpoint"]))
    x = torch.tensor(src)
    mask = torch.ones_like(x)
    eos = cfg["eos_id"]

    @torch.no_grad()
    def nocache() -> list[list[int]]:
        enc = model.encode(x, mask)
        ys = torch.full((batch, 1), cfg["bos_id"])
        for _ in range(tokens):
            logits, _ = model.decode(ys, torch.ones_like(ys), enc, mask)
            step = logits[:, -1]
            step[:, eos] = -float("inf")
            ys = torch.cat([ys, step.argmax(-1, keepdim=True)], 1)
        return ys[:, 1:].tolist()

    @torch.no_grad()
    def cached() -> list[list[int]]:
        enc = model.encode(x, mask)
        past = model.empty_past(batch)
        tok = torch.full((batch,), cfg["bos_id"])
        sm = torch.ones(batch, 1, dtype=torch.long)
        out = []
        for t in range(tokens):
            r = model.decode_step(tok, torch.full((batch,), t), past, sm, enc.cross_kv, mask)
            r.logits[:, eos] = -float("inf")
            tok = r.logits.argmax(-1)
            out.append(tok)
            past = r.present
            sm = torch.cat([sm, torch.ones(batch, 1, dtype=torch.long)], 1)
        return torch.stack(out, 1).tolist()

    return nocache if engine == "torch-nocache" else cached


def hf_decoder(prep: dict[str, Any], src: list[list[int]], tokens: int) -> Decode:
    """transformers' own greedy generate on the Marian directory, exactly `tokens` tokens."""
    import torch
    from transformers import MarianMTModel

    model = MarianMTModel.from_pretrained(prep["dir"]).eval()
    x = torch.tensor(src)

    @torch.no_grad()
    def decode() -> list[list[int]]:
        out = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), num_beams=1, do_sample=False,
            min_new_tokens=tokens, max_new_tokens=tokens, forced_eos_token_id=None,
        )  # fmt: skip
        return out[:, 1:].tolist()  # without the decoder start token

    return decode


def ort_decoder(engine: str, prep: dict[str, Any], src: list[list[int]], tokens: int,
                threads: int, spin: bool) -> Decode:  # fmt: skip
    """Our decoding (service.engine) over the bundle; every row runs exactly `tokens` steps.
    spin: the decoder's idle intra-op threads spin between steps (RuntimeConfig.spin), as
    offline decoding runs best and as CTranslate2's OpenMP threads do by default."""
    from service.bundle import load_bundle
    from service.engine import SentenceJob
    from service.runtime import Runtime, RuntimeConfig
    from tests.doubles import Exact, ExactLength

    b = load_bundle(prep["bundle"])
    cfg = RuntimeConfig("cpu", engine[4:], threads, spin=spin)
    eng = ExactLength(Runtime(b, cfg), b.limits)

    def decode() -> list[list[int]]:
        jobs: list[SentenceJob] = [Exact(list(s), tokens) for s in src]
        return [r.token_ids for r in eng.decode_all(jobs, max_rows=len(src))]

    return decode


def ct2_decoder(engine: str, prep: dict[str, Any], src: list[list[int]], tokens: int,
                threads: int) -> Decode:  # fmt: skip
    """CTranslate2 on its conversion of the same weights; pieces in and out."""
    import ctranslate2

    tr = ctranslate2.Translator(
        str(Path(prep["work"]) / "ct2"), device="cpu",
        compute_type="int8" if engine == "ct2-int8" else "float32",
        inter_threads=1, intra_threads=threads,
    )  # fmt: skip
    names = prep["pieces"]
    ids = {p: i for i, p in enumerate(names)}
    pieces = [[names[i] for i in s] for s in src]

    def decode() -> list[list[int]]:
        res = tr.translate_batch(
            pieces, beam_size=1, max_batch_size=len(src), min_decoding_length=tokens,
            max_decoding_length=tokens,
        )  # fmt: skip
        return [[ids[p] for p in r.hypotheses[0]] for r in res]

    return decode


def run_engine(engine: str, prep: dict[str, Any], batch: int, src_len: int, tokens: int,
               threads: int, repeats: int, spin: bool = True) -> dict[str, Any]:  # fmt: skip
    src = sources(prep, batch, src_len)
    if engine.startswith("torch"):
        import torch

        torch.set_num_threads(threads)
        decode = torch_decoder(engine, prep, src, tokens)
    elif engine == "hf-generate":
        import torch

        torch.set_num_threads(threads)
        decode = hf_decoder(prep, src, tokens)
    elif engine.startswith("ort"):
        decode = ort_decoder(engine, prep, src, tokens, threads, spin)
    else:
        decode = ct2_decoder(engine, prep, src, tokens, threads)
    out = decode()  # warm-up, and the tokens to compare
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        decode()
        best = min(best, time.perf_counter() - t)
    return {"engine": engine, "batch": batch, "seconds": best,
            "tokens_per_s": batch * tokens / best, "tokens": out}  # fmt: skip


def flops_per_token(cfg: dict[str, Any], src_len: int, tokens: int) -> float:
    """Multiply-adds ×2 per generated token: the decoder's projections and FFN, the output
    projection, attention over the cache and the source, and the encoder amortised."""
    d, f, v = cfg["d_model"], cfg["d_ff"], cfg.get("tgt_vocab_size") or cfg["vocab_size"]
    dec_layer = 4 * d * d + 2 * d * d + 2 * d * f  # self Q,K,V,O + cross Q,O + FFN
    attn = 2 * d * (tokens / 2 + src_len)  # scores and weighted sums, average past length
    enc = cfg["n_encoder_layers"] * (4 * d * d + 2 * d * f) + cfg["n_decoder_layers"] * 2 * d * d
    per_token = cfg["n_decoder_layers"] * (dec_layer + attn) + d * v + enc * src_len / tokens
    return 2.0 * per_token


# ----------------------------------------------------------------------------- rounds


def run_worker(args: argparse.Namespace, prep: dict[str, Any], engine: str, batch: int
               ) -> dict[str, Any] | None:  # fmt: skip
    """One engine at one batch size, in a process of its own."""
    flags = ["--src-len", str(args.src_len), "--tokens", str(args.tokens),
             "--threads", str(args.threads), "--repeats", str(args.repeats),
             "--ort-spin", args.ort_spin]  # fmt: skip
    job = Path(prep["work"]) / "worker.json"  # a file: a vocabulary is too long for argv
    job.write_text(json.dumps([prep, engine, batch]))
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(job), *flags],
        capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )  # fmt: skip
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        print(f"{engine} batch {batch} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return dict(json.loads(line[0][7:]))


def baseline(engine: str) -> str:
    """The CTranslate2 engine each engine is compared with: int8 with int8."""
    return "ct2-int8" if engine.endswith("int8") else "ct2-fp32"


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """median (min–max) of values."""
    if not values:
        return "—"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def agreement(r: dict[str, Any], ref: dict[str, Any] | None) -> str:
    if ref is None:
        return "—"
    if r["tokens"] == ref["tokens"]:
        return "yes"
    same = sum(a == b for a, b in zip(r["tokens"], ref["tokens"], strict=True))
    return f"{same}/{len(ref['tokens'])} rows"


def table(rows: list[dict[str, Any]], engines: list[str], ref_engine: str, fpt: float,
          peak_gflops: float) -> list[str]:  # fmt: skip
    """Per batch and engine: tokens/s and ratio, each the median over rounds (min–max)."""
    head = "| batch | engine | tokens/s | × ct2 (same precision) | % of peak | same tokens as"
    out = [f"{head} {ref_engine} |", "|---:|---|---:|---:|---:|---|"]
    for batch in sorted({r["batch"] for r in rows}):
        cell = {(r["engine"], r["round"]): r for r in rows if r["batch"] == batch}
        rounds = sorted({k[1] for k in cell})
        for engine in engines:
            runs = [cell[engine, k] for k in rounds if (engine, k) in cell]
            if not runs:
                continue
            speeds = [r["tokens_per_s"] for r in runs]
            base = baseline(engine)
            ratios = [cell[engine, k]["tokens_per_s"] / cell[base, k]["tokens_per_s"]
                      for k in rounds if (engine, k) in cell and (base, k) in cell]  # fmt: skip
            peak = 100 * statistics.median(speeds) * fpt / (peak_gflops * 1e9)
            same = agreement(runs[0], cell.get((ref_engine, rounds[0])))
            out.append(f"| {batch} | {engine} | {spread(speeds, '{:.1f}')} | {spread(ratios)} "
                       f"| {peak:.1f} | {same} |")  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=["default", *SIZES, *MARIAN], default="default")
    ap.add_argument("--run", default="runs/default", help="run directory (--model default)")
    ap.add_argument("--engines", help="comma list (default: every engine of the model kind)")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every cell")
    ap.add_argument("--src-len", type=int, default=12, help="source tokens per sentence")
    ap.add_argument("--tokens", type=int, default=32, help="output tokens per sentence")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per process (best counts)")
    ap.add_argument("--ort-spin", choices=["on", "off"], default="on",
                    help="our decoder's idle intra-op threads spin between steps (offline "
                    "decoding's setting; the server's is off)")  # fmt: skip
    ap.add_argument("--peak-gflops", type=float, default=156.5)
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        prep, engine, batch = json.loads(Path(args.worker).read_text())
        res = run_engine(engine, prep, batch, args.src_len, args.tokens, args.threads,
                         args.repeats, args.ort_spin == "on")  # fmt: skip
        print("RESULT " + json.dumps(res))
        return 0
    marian = args.model in MARIAN
    engines = (args.engines or ",".join(MARIAN_ENGINES if marian else ENGINES)).split(",")
    ref_engine = "hf-generate" if marian else "torch-cache"
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.model}-"))
    t = time.perf_counter()
    prep = prepare(args.model, args.run, work)
    print(f"prepared {args.model} in {time.perf_counter() - t:.0f}s ({work})", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for k in range(args.rounds):
        for batch in (int(b) for b in args.batches.split(",")):
            for engine in engines:  # interleaved: every engine at this batch size, then the next
                r = run_worker(args, prep, engine, batch)
                if r is None:
                    continue
                rows.append({**r, "round": k})
                print(f"round {k + 1} {engine:>14} batch {batch:>3}: "
                      f"{r['tokens_per_s']:9.1f} tokens/s", file=sys.stderr)  # fmt: skip
    fpt = flops_per_token(prep["cfg"], args.src_len, args.tokens)
    print(f"\nmodel {args.model}: {json.dumps({k: prep['cfg'][k] for k in SHOWN})}")
    print(f"{args.tokens} output tokens per row, {args.src_len} source tokens, "
          f"{args.threads} threads (our decoder's spinning {args.ort_spin}), "
          f"{args.rounds} interleaved round(s); "
          f"~{fpt / 1e6:.1f} MFLOP per generated token\n")  # fmt: skip
    print("\n".join(table(rows, engines, ref_engine, fpt, args.peak_gflops)))
    print("\nTokens/s of each round:")
    for r in rows:
        print(f"  round {r['round'] + 1} batch {r['batch']} {r['engine']}: "
              f"{r['tokens_per_s']:.1f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"prep": prep, "rows": rows}, indent=2))
    return verdict(rows, engines, ref_engine)


def verdict(rows: list[dict[str, Any]], engines: list[str], ref_engine: str) -> int:
    """The benchmark's exit status: 1, naming them, when fp32 engines' tokens differ from the
    reference's (their figures would compare different work), else 0."""
    failed = mismatched(rows, engines, ref_engine)
    if failed:
        print(f"\nfp32 engines whose tokens differ from {ref_engine}: {failed}", file=sys.stderr)
    return 1 if failed else 0


def mismatched(rows: list[dict[str, Any]], engines: list[str], ref_engine: str) -> list[str]:
    """fp32 engines whose tokens differ from the reference's at some batch size (int8 may)."""
    ref = {r["batch"]: r["tokens"] for r in rows if r["engine"] == ref_engine and r["round"] == 0}
    return sorted({
        f"{r['engine']}@{r['batch']}" for r in rows
        if r["round"] == 0 and not r["engine"].endswith("int8") and r["batch"] in ref
        and r["tokens"] != ref[r["batch"]]
    })  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
