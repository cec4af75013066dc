"""Engine benchmark: the same weights and inputs in PyTorch, our onnxruntime decoding and
CTranslate2, greedy, with every row forced to exactly --tokens output tokens.

    python benchmarks/engines.py --model default --run runs/default      # or: make bench-engines
    python benchmarks/engines.py --model base                           # d512, 6+6, 8 heads, 32k

Engines: torch-nocache (eager, the decoder re-run over the whole prefix every step),
torch-cache (eager, KV cache), ort-fp32 / ort-int8 (service.engine over the exported graphs),
ct2-fp32 / ct2-int8 (CTranslate2, converted by export.ct2). Each engine and batch size runs in
its own process (two engines in one process disturb each other), engines are interleaved, and
every engine's tokens are checked against torch-cache before its time counts. Reported:
generated tokens/s (best of --repeats), the ratio to ct2-fp32 measured in the same run, and the
share of the machine's fp32 peak (--peak-gflops, 156.5 for this 2-core Zen 3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bundles import SIZES  # noqa: E402

ENGINES = ("torch-nocache", "torch-cache", "ort-fp32", "ort-int8", "ct2-fp32", "ct2-int8")
SHOWN = ("vocab_size", "d_model", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers")


def inputs(vocab: int, batch: int, src_len: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(src_len)] for _ in range(batch)]


# ----------------------------------------------------------------------------- preparation


def prepare(model_name: str, run: str | None, work: Path) -> dict[str, Any]:
    """Checkpoint, ONNX bundle (fp32 + int8) and CTranslate2 models of the same weights."""
    import torch

    from benchmarks.bundles import random_model, write_bundle
    from export.checkpoint import model_from_checkpoint
    from export.ct2 import build_spec

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
    return {"checkpoint": str(ckpt), "bundle": str(bundle), "work": str(work), "cfg": cfg.to_dict()}


# ----------------------------------------------------------------------------- workers


def run_engine(engine: str, prep: dict[str, Any], batch: int, src_len: int, tokens: int,
               threads: int, repeats: int) -> dict[str, Any]:  # fmt: skip
    cfg = prep["cfg"]
    src = inputs(cfg["vocab_size"], batch, src_len, seed=batch)
    if engine.startswith("torch"):
        import torch

        from export.checkpoint import model_from_checkpoint

        torch.set_num_threads(threads)
        model, _ = model_from_checkpoint(Path(prep["checkpoint"]))
        x = torch.tensor(src)
        mask = torch.ones_like(x)

        @torch.no_grad()
        def decode() -> list[list[int]]:
            eos = cfg["eos_id"]
            if engine == "torch-nocache":
                enc = model.encode(x, mask)
                ys = torch.full((batch, 1), cfg["bos_id"])
                for _ in range(tokens):
                    logits, _ = model.decode(ys, torch.ones_like(ys), enc, mask)
                    step = logits[:, -1]
                    step[:, eos] = -float("inf")
                    ys = torch.cat([ys, step.argmax(-1, keepdim=True)], 1)
                return ys[:, 1:].tolist()
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

    elif engine.startswith("ort"):
        from service.bundle import load_bundle
        from service.engine import SentenceJob
        from service.runtime import Runtime, RuntimeConfig
        from tests.doubles import Exact, ExactLength

        b = load_bundle(prep["bundle"])
        # Every row runs exactly `tokens` steps (EOS masked), as the other engines here do.
        eng = ExactLength(Runtime(b, RuntimeConfig("cpu", engine[4:], threads)), b.limits)

        def decode() -> list[list[int]]:
            jobs: list[SentenceJob] = [Exact(list(s), tokens) for s in src]
            return [r.token_ids for r in eng.decode_all(jobs, max_rows=batch)]

    else:
        import ctranslate2

        tr = ctranslate2.Translator(
            str(Path(prep["work"]) / "ct2"),
            device="cpu",
            compute_type="int8" if engine == "ct2-int8" else "float32",
            inter_threads=1,
            intra_threads=threads,
        )
        special = {0: "<pad>", 1: "<unk>", 2: "<s>", 3: "</s>"}
        pieces = [[special.get(i, f"p{i}") for i in s] for s in src]

        def decode() -> list[list[int]]:
            res = tr.translate_batch(
                pieces, beam_size=1, max_batch_size=batch, min_decoding_length=tokens,
                max_decoding_length=tokens,
            )  # fmt: skip
            ids = {v: k for k, v in special.items()}
            return [[ids[p] if p in ids else int(p[1:]) for p in r.hypotheses[0]] for r in res]

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
    d, f, v = cfg["d_model"], cfg["d_ff"], cfg["vocab_size"]
    dec_layer = 4 * d * d + 2 * d * d + 2 * d * f  # self Q,K,V,O + cross Q,O + FFN
    attn = 2 * d * (tokens / 2 + src_len)  # scores and weighted sums, average past length
    enc = cfg["n_encoder_layers"] * (4 * d * d + 2 * d * f) + cfg["n_decoder_layers"] * 2 * d * d
    per_token = cfg["n_decoder_layers"] * (dec_layer + attn) + d * v + enc * src_len / tokens
    return 2.0 * per_token


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=["default", *SIZES], default="default")
    ap.add_argument("--run", default="runs/default", help="run directory (--model default)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--src-len", type=int, default=12, help="source tokens per sentence")
    ap.add_argument("--tokens", type=int, default=32, help="output tokens per sentence")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-gflops", type=float, default=156.5)
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        prep, engine, batch = json.loads(args.worker)
        res = run_engine(engine, prep, batch, args.src_len, args.tokens, args.threads,
                         args.repeats)  # fmt: skip
        print("RESULT " + json.dumps(res))
        return 0

    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.model}-"))
    t = time.perf_counter()
    prep = prepare(args.model, args.run, work)
    print(f"prepared {args.model} in {time.perf_counter() - t:.0f}s ({work})", file=sys.stderr)
    engines = args.engines.split(",")
    rows: list[dict[str, Any]] = []
    for batch in (int(b) for b in args.batches.split(",")):
        for engine in engines:  # interleaved: every engine at this batch size, then the next
            worker = json.dumps([prep, engine, batch])
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    worker,
                    "--src-len",
                    str(args.src_len),
                    "--tokens",
                    str(args.tokens),
                    "--threads",
                    str(args.threads),
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                cwd=REPO,
                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{engine} batch {batch} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[0][7:]))
            print(f"{engine:>14} batch {batch:>3}: {rows[-1]['tokens_per_s']:9.1f} tokens/s",
                  file=sys.stderr)  # fmt: skip
    fpt = flops_per_token(prep["cfg"], args.src_len, args.tokens)
    print(f"\nmodel {args.model}: {json.dumps({k: prep['cfg'][k] for k in SHOWN})}")
    print(f"{args.tokens} output tokens per row, {args.src_len} source tokens, "
          f"{args.threads} threads; ~{fpt / 1e6:.1f} MFLOP per generated token\n")  # fmt: skip
    print("| batch | engine | tokens/s | × ct2-fp32 | % of peak | same tokens as torch-cache |")
    print("|---:|---|---:|---:|---:|---|")
    for batch in sorted({r["batch"] for r in rows}):
        here = {r["engine"]: r for r in rows if r["batch"] == batch}
        ref = here.get("torch-cache")
        ct2 = here.get("ct2-fp32")
        for engine in engines:
            r = here.get(engine)
            if r is None:
                continue
            ratio = f"{r['tokens_per_s'] / ct2['tokens_per_s']:.2f}" if ct2 else "—"
            peak = 100 * r["tokens_per_s"] * fpt / (args.peak_gflops * 1e9)
            same = "—" if ref is None else (
                "yes" if r["tokens"] == ref["tokens"] else
                f"{sum(a == b for a, b in zip(r['tokens'], ref['tokens'], strict=True))}"
                f"/{batch} rows"
            )  # fmt: skip
            print(
                f"| {batch} | {engine} | {r['tokens_per_s']:.1f} | {ratio} | {peak:.1f} | {same} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"prep": prep, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
