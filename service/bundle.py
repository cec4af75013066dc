"""The model bundle contract, defined once: the exporter writes bundles with it and the
service loads them with it (no torch, no grpc here).

A bundle is a directory holding the ONNX graphs, the tokenizer files and ``manifest.json``.
The manifest records the format and its version, hyper-parameters and special ids, the
output-length rule, every graph's file and input/output names, and every file's sha256.
``tokenizer.type`` says which tokenizer the bundle carries: ``sentencepiece`` (our trainer's
one model file) or ``marian`` (an imported Marian / OPUS-MT model's ``source.spm``,
``target.spm``, ``vocab.json`` and, with separate vocabularies, ``target_vocab.json``).
The optional ``generation`` holds how greedy decoding starts and what it never emits (an
imported model's generation settings); bundles without it start from ``bos_id`` and may emit
any id.
``load_bundle`` refuses a bundle whose manifest or checksums do not hold, naming every file at
fault. Only ONNX graphs, JSON and the SentencePiece model are read from a bundle — no pickle,
no code — and checksums are verified before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "nmtserve-bundle"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION,)
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
# Graph file names per precision. "decoder_kv" (the decoder over preallocated caches updated in
# place) and "encoder_packed" (the encoder over sentences packed without padding) are optional:
# bundles without them are served with "decoder" and "encoder".
GRAPH_FILES = {
    "fp32": {
        "encoder": "encoder.onnx",
        "decoder": "decoder.onnx",
        "decoder_kv": "decoder_kv.onnx",
        "encoder_packed": "encoder_packed.onnx",
    },
    "int8": {
        "encoder": "encoder.int8.onnx",
        "decoder": "decoder.int8.onnx",
        "decoder_kv": "decoder_kv.int8.onnx",
        "encoder_packed": "encoder_packed.int8.onnx",
    },
}
REQUIRED_KEYS = ("format", "format_version", "model", "tokenizer", "limits", "onnx", "files")
TOKENIZER_TYPES = ("sentencepiece", "marian")
# The marian tokenizer's files by role; target_vocab only with separate vocabularies.
MARIAN_FILES = {
    "source_spm": "source.spm",
    "target_spm": "target.spm",
    "vocab": "vocab.json",
    "target_vocab": "target_vocab.json",
}


def tokenizer_files(spec: dict[str, Any]) -> list[str]:
    """The files of a manifest's ``tokenizer`` (checksummed like every file); none where the
    spec is malformed (its own check says why)."""
    if spec.get("type", "sentencepiece") == "marian":
        files = spec.get("files")
        return (
            [f for f in files.values() if isinstance(f, str) and f]
            if isinstance(files, dict)
            else []
        )
    file = spec.get("file")
    return [file] if isinstance(file, str) and file else []


def output_cap(max_length: int, forced_eos: bool) -> int:
    """Output tokens (eos excluded) that transformers' generate allows under ``max_length``:
    its length counts the decoder start token, and with ``forced_eos_token_id`` the last
    position is eos, so the text gets max_length - 1, or max_length - 2 with a forced eos."""
    return max_length - 1 - int(forced_eos)


@dataclass(frozen=True)
class GraphIO:
    """The names of every graph's inputs and outputs, in order, for a model's decoder layer
    count. Sessions are fed and read by these names, never by position."""

    n_layers: int

    def _kv(self, pattern: str) -> list[str]:
        return [pattern.format(i=i, kv=kv) for i in range(self.n_layers) for kv in ("key", "value")]

    @property
    def past(self) -> list[str]:  # the decoder's own keys/values so far, per layer
        return self._kv("past_key_values.{i}.decoder.{kv}")

    @property
    def cross(self) -> list[str]:  # the encoder's keys/values, the decoder's inputs
        return self._kv("past_key_values.{i}.encoder.{kv}")

    @property
    def present(self) -> list[str]:  # the decoder's keys/values after the step
        return self._kv("present.{i}.decoder.{kv}")

    @property
    def encoder_kv(self) -> list[str]:  # the encoder's outputs for the cross attention
        return self._kv("present.{i}.encoder.{kv}")

    @property
    def cross_attentions(self) -> list[str]:
        return [f"cross_attentions.{i}" for i in range(self.n_layers)]

    @property
    def encoder_inputs(self) -> list[str]:
        return ["input_ids", "attention_mask"]

    @property
    def encoder_outputs(self) -> list[str]:
        return ["last_hidden_state", *self.encoder_kv]

    @property
    def decoder_inputs(self) -> list[str]:
        return [
            "input_ids",
            "position_ids",
            "decoder_attention_mask",
            "encoder_attention_mask",
            *self.past,
            *self.cross,
        ]

    @property
    def decoder_outputs(self) -> list[str]:
        return ["logits", *self.present, *self.cross_attentions]

    @property
    def cached_decoder_inputs(self) -> list[str]:  # decoder_kv: no self-attention mask
        return ["input_ids", "position_ids", "encoder_attention_mask", *self.past, *self.cross]

    @property
    def packed_encoder_inputs(self) -> list[str]:  # encoder_packed; outputs as the encoder's
        return ["input_ids", "position_ids", "segment_ids"]

    def manifest(self) -> dict[str, dict[str, list[str]]]:
        """``onnx.io`` of a manifest: each graph part's input and output names."""
        return {
            "encoder": {"inputs": self.encoder_inputs, "outputs": self.encoder_outputs},
            "decoder": {"inputs": self.decoder_inputs, "outputs": self.decoder_outputs},
            "decoder_kv": {"inputs": self.cached_decoder_inputs, "outputs": self.decoder_outputs},
            "encoder_packed": {
                "inputs": self.packed_encoder_inputs,
                "outputs": self.encoder_outputs,
            },
        }


def graph_io(n_decoder_layers: int) -> GraphIO:
    return GraphIO(n_decoder_layers)


class BundleError(ValueError):
    """The bundle cannot be served; the message names every problem found."""

    def __init__(self, directory: Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"bundle {directory} refused:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Limits:
    """The output-length rule (the trainer's, the exporter's and the service's): a sentence of
    n source tokens may get min(max_target_tokens, ceil(a·n + b)) output tokens."""

    max_source_tokens: int = 128
    max_target_tokens: int = 128
    a: float = 2.0
    b: float = 10.0

    def target_limit(self, source_tokens: int, requested: int = 0) -> int:
        """min(requested (0: none), max_target_tokens, ceil(a·source_tokens + b))."""
        limit = min(self.max_target_tokens, -int(-(self.a * source_tokens + self.b) // 1))
        return min(limit, requested) if requested > 0 else limit


@dataclass(frozen=True)
class Bundle:
    directory: Path
    manifest: dict[str, Any]

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.manifest["model"])

    @property
    def limits(self) -> Limits:
        """The output-length rule; a generation ``max_length`` caps max_target_tokens too."""
        lim = self.manifest["limits"]
        max_target = int(lim["max_target_tokens"])
        gen = self.generation
        if gen.get("max_length") is not None:
            cap = output_cap(int(gen["max_length"]), bool(gen.get("forced_eos", False)))
            max_target = min(max_target, cap)
        return Limits(
            int(lim["max_source_tokens"]),
            max_target,
            float(lim["target_tokens_a"]),
            float(lim["target_tokens_b"]),
        )

    @property
    def generation(self) -> dict[str, Any]:
        return dict(self.manifest.get("generation") or {})

    @property
    def target_vocab_size(self) -> int:
        """The decoder's vocabulary (the logits' width): the model's own when separate."""
        model = self.manifest["model"]
        return int(model.get("tgt_vocab_size") or model["vocab_size"])

    @property
    def decoder_start_id(self) -> int:
        """Every output row's first decoder input."""
        return int(self.generation.get("decoder_start_id", self.manifest["model"]["bos_id"]))

    @property
    def suppressed_ids(self) -> list[int]:
        """Ids never generated (their logits are -inf before the argmax)."""
        return [int(i) for i in self.generation.get("suppressed_ids", [])]

    @property
    def precisions(self) -> list[str]:
        return sorted(self.manifest["onnx"]["graphs"])

    def has_graph(self, precision: str, part: str) -> bool:
        return part in self.manifest["onnx"]["graphs"].get(precision, {})

    def graph(self, precision: str, part: str) -> Path:
        graphs = self.manifest["onnx"]["graphs"]
        if precision not in graphs:
            raise BundleError(
                self.directory,
                [f"precision {precision!r} is not in this bundle (it has {sorted(graphs)})"],
            )
        return self.directory / graphs[precision][part]

    def io(self, part: str) -> dict[str, list[str]]:
        """A graph part's input and output names, as the manifest records them (bundles
        written before the manifest did: the contract's, which they were exported with)."""
        recorded = self.manifest["onnx"].get("io")
        if recorded is not None:
            return dict(recorded[part])
        return graph_io(int(self.manifest["model"]["n_decoder_layers"])).manifest()[part]

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / self.manifest["tokenizer"]["file"]

    def sha256(self, name: str) -> str:
        return str(self.manifest["files"][name]["sha256"])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``files`` of a manifest: each file's sha256 and size."""
    return {
        n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size}
        for n in sorted(names)
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Writes manifest.json atomically (a reader never sees half of it)."""
    path = directory / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


_MODEL_KEYS = ("vocab_size", "d_model", "n_heads", "n_decoder_layers", "bos_id", "eos_id", "pad_id")


def load_bundle(directory: str | Path) -> Bundle:
    """Reads manifest.json, checks its format and fields, then every file's sha256."""
    root = Path(directory)
    manifest = _read_manifest(root)
    problems = [f"{MANIFEST} lacks {k!r}" for k in REQUIRED_KEYS if k not in manifest]
    problems += [
        f"{MANIFEST}: {k} is not a JSON object"
        for k in ("model", "files", "onnx", "tokenizer", "limits")
        if k in manifest and not isinstance(manifest[k], dict)
    ]
    if problems:
        raise BundleError(root, problems)
    if manifest["format"] != FORMAT:
        problems.append(f"{MANIFEST}: format is {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
        problems.append(
            f"{MANIFEST}: format_version {manifest['format_version']!r} is not supported "
            f"(this server reads {list(SUPPORTED_FORMAT_VERSIONS)})"
        )
    problems += _model_problems(manifest["model"]) + _limit_problems(manifest)
    problems += _tokenizer_problems(manifest["tokenizer"])
    problems += _generation_problems(manifest)
    graph_problems, used = _graph_problems(manifest["onnx"])
    problems += graph_problems
    problems += _file_problems(
        root, manifest["files"], tokenizer_files(manifest["tokenizer"]) + used
    )
    if problems:
        raise BundleError(root, problems)
    return Bundle(root, manifest)


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


# Bounds on a model's shapes: far beyond any translation model, small enough that nothing the
# service allocates from them can exhaust memory before the graphs are even opened.
_MODEL_BOUNDS = {"vocab_size": 1 << 20, "d_model": 1 << 15, "n_heads": 256,
                 "n_decoder_layers": 256, "max_positions": 1 << 16}  # fmt: skip


def _model_problems(model: dict[str, Any]) -> list[str]:
    problems = [f"{MANIFEST}: model lacks {k!r}" for k in _MODEL_KEYS if k not in model]
    for key, hi in _MODEL_BOUNDS.items():
        if key in model and not _is_int(model[key], 1, hi):
            problems.append(f"{MANIFEST}: model.{key} must be an integer from 1 to {hi}")
    vocab: int = model.get("vocab_size", 0)
    if not _is_int(vocab, 1, 1 << 20):
        return problems
    for key in ("bos_id", "eos_id", "pad_id"):
        if key in model and not _is_int(model[key], 0, vocab - 1):
            problems.append(f"{MANIFEST}: model.{key} must be an id below {vocab}")
    return problems


def _limit_problems(manifest: dict[str, Any]) -> list[str]:
    """The length limits: numbers within the model's positions (a decoder row feeds its
    outputs at positions 0..max_target_tokens-1), so nothing is sized beyond the model."""
    lim = manifest["limits"]
    positions = manifest["model"].get("max_positions", lim.get("max_positions"))
    if not _is_int(positions, 1, 1 << 16):
        positions = 1 << 16  # its own check names it; bound the limits all the same
    problems = []
    for key, hi in (("max_source_tokens", positions), ("max_target_tokens", positions)):
        if not _is_int(lim.get(key), 1, hi):
            problems.append(f"{MANIFEST}: limits.{key} must be an integer from 1 to {hi} "
                            "(the model's positions)")  # fmt: skip
    for key in ("target_tokens_a", "target_tokens_b"):
        v = lim.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1e6:
            problems.append(f"{MANIFEST}: limits.{key} must be a number from 0 to 1e6")
    return problems


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(root, ["the bundle directory does not exist"])
    if not path.is_file():
        raise BundleError(root, [f"{MANIFEST} is missing"])
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(root, [f"{MANIFEST} is not valid JSON: {e}"]) from e
    if not isinstance(manifest, dict):
        raise BundleError(root, [f"{MANIFEST} is not a JSON object"])
    return manifest


def _graph_problems(onnx: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What is wrong with the graph lists and their recorded IO names, and the graph files."""
    problems: list[str] = []
    used: list[str] = []
    graphs_of = onnx.get("graphs")
    if not (isinstance(graphs_of, dict) and graphs_of):
        return [f"{MANIFEST}: onnx.graphs must map precisions to their graph files"], used
    for precision, graphs in graphs_of.items():
        if not (isinstance(graphs, dict) and all(isinstance(f, str) for f in graphs.values())):
            problems.append(f"{MANIFEST}: onnx.graphs.{precision} must map parts to file names")
            continue
        for part in ("encoder", "decoder"):
            if part not in graphs:
                problems.append(f"{MANIFEST}: {precision} graphs lack the {part}")
        used += list(graphs.values())
    io = onnx.get("io")
    if io is not None:  # recorded since 2026-12-04; older bundles follow GraphIO
        parts = {p for graphs in graphs_of.values() if isinstance(graphs, dict) for p in graphs}
        problems += [
            f"{MANIFEST}: onnx.io lacks the {part} graph's input and output names"
            for part in sorted(parts)
            if not (
                isinstance(io, dict)
                and isinstance(io.get(part), dict)
                and all(isinstance(io[part].get(k), list) for k in ("inputs", "outputs"))
            )
        ]
    return problems, used


def _file_problems(root: Path, files: dict[str, Any], used: list[str]) -> list[str]:
    """Files used but not listed; listed files outside the bundle, missing, or changed."""
    problems = [f"{name}: used but not listed in {MANIFEST}" for name in used if name not in files]
    inside = root.resolve()
    for name, entry in sorted(files.items()):
        f = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name}: file names must stay inside the bundle")
        elif inside not in f.resolve().parents:  # a link may point only within the bundle
            problems.append(f"{name}: a link to {f.resolve()}, outside the bundle")
        elif not f.is_file():
            problems.append(f"{name}: missing")
        elif not isinstance(entry, dict) or sha256_file(f) != entry.get("sha256"):
            problems.append(f"{name}: sha256 does not match {MANIFEST} (corrupt or replaced)")
    return problems


def _tokenizer_problems(spec: Any) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{MANIFEST}: tokenizer is not an object"]
    kind = spec.get("type", "sentencepiece")
    if kind not in TOKENIZER_TYPES:
        return [f"{MANIFEST}: tokenizer.type {kind!r} is not one of {list(TOKENIZER_TYPES)}"]
    if kind != "marian":
        file = spec.get("file")
        ok = isinstance(file, str) and file
        return [] if ok else [f"{MANIFEST}: tokenizer.file must name the SentencePiece model"]
    problems = []
    files = spec.get("files")
    if not isinstance(files, dict):
        return [f"{MANIFEST}: tokenizer.files is missing (the marian tokenizer's files)"]
    problems += [
        f"{MANIFEST}: tokenizer.files lacks {role!r}"
        for role in ("source_spm", "target_spm", "vocab")
        if not files.get(role)
    ]
    specials = spec.get("special_tokens")
    if not (isinstance(specials, list) and all(isinstance(t, str) and t for t in specials)):
        problems.append(f"{MANIFEST}: tokenizer.special_tokens must be a list of strings")
    else:
        problems += [
            f"{MANIFEST}: tokenizer.{key} must be one of tokenizer.special_tokens"
            for key in ("eos_token", "unk_token")
            if spec.get(key) not in specials
        ]
    return problems


def _generation_problems(manifest: dict[str, Any]) -> list[str]:
    gen = manifest.get("generation")
    if gen is None:
        return []
    if not isinstance(gen, dict):
        return [f"{MANIFEST}: generation is not an object"]
    model = manifest["model"]
    vocab = int(model.get("tgt_vocab_size") or model.get("vocab_size", 0))
    problems = []

    def is_id(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab

    if "decoder_start_id" in gen and not is_id(gen["decoder_start_id"]):
        problems.append(f"{MANIFEST}: generation.decoder_start_id must be an id below {vocab}")
    suppressed = gen.get("suppressed_ids", [])
    if not (isinstance(suppressed, list) and all(is_id(i) for i in suppressed)):
        problems.append(f"{MANIFEST}: generation.suppressed_ids must be a list of ids < {vocab}")
    elif model.get("eos_id") in suppressed:
        problems.append(f"{MANIFEST}: generation.suppressed_ids holds eos: no row could end")
    length = gen.get("max_length")
    if length is not None and not (isinstance(length, int) and output_cap(length, True) >= 1):
        problems.append(f"{MANIFEST}: generation.max_length must be an integer ≥ 3 (or null)")
    if not isinstance(gen.get("forced_eos", False), bool):
        problems.append(f"{MANIFEST}: generation.forced_eos must be true or false")
    return problems
