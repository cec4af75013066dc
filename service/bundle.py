"""The model bundle contract, defined once: the exporter writes bundles with it and the
service loads them with it (no torch, no grpc here).

A bundle is a directory holding the ONNX graphs, the tokenizer model and ``manifest.json``.
The manifest records the format and its version, hyper-parameters and special ids, the
output-length rule, every graph's file and input/output names, and every file's sha256.
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
        lim = self.manifest["limits"]
        return Limits(
            int(lim["max_source_tokens"]),
            int(lim["max_target_tokens"]),
            float(lim["target_tokens_a"]),
            float(lim["target_tokens_b"]),
        )

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
    problems = [f"{MANIFEST} lacks {k!r}" for k in REQUIRED_KEYS if k not in manifest]
    if problems:
        raise BundleError(root, problems)
    if manifest["format"] != FORMAT:
        problems.append(f"{MANIFEST}: format is {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
        problems.append(
            f"{MANIFEST}: format_version {manifest['format_version']!r} is not supported "
            f"(this server reads {list(SUPPORTED_FORMAT_VERSIONS)})"
        )
    problems += [
        f"{MANIFEST}: model lacks {k!r}" for k in _MODEL_KEYS if k not in manifest["model"]
    ]
    files = manifest["files"]
    used = [manifest["tokenizer"].get("file", "")]
    for precision, graphs in manifest["onnx"].get("graphs", {}).items():
        for part in ("encoder", "decoder"):
            if part not in graphs:
                problems.append(f"{MANIFEST}: {precision} graphs lack the {part}")
            else:
                used.append(graphs[part])
        used += [f for part, f in graphs.items() if part not in ("encoder", "decoder")]
    io = manifest["onnx"].get("io")
    if io is not None:  # recorded since 2026-12-04; older bundles follow GraphIO
        parts = {p for graphs in manifest["onnx"].get("graphs", {}).values() for p in graphs}
        problems += [
            f"{MANIFEST}: onnx.io lacks the {part} graph's input and output names"
            for part in sorted(parts)
            if not (
                isinstance(io, dict)
                and isinstance(io.get(part), dict)
                and all(isinstance(io[part].get(k), list) for k in ("inputs", "outputs"))
            )
        ]
    problems += [f"{name}: used but not listed in {MANIFEST}" for name in used if name not in files]
    for name, entry in sorted(files.items()):
        f = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name}: file names must stay inside the bundle")
        elif not f.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(f) != entry.get("sha256"):
            problems.append(f"{name}: sha256 does not match {MANIFEST} (corrupt or replaced)")
    if problems:
        raise BundleError(root, problems)
    return Bundle(root, manifest)
