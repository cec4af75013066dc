"""Loading a model bundle on the serving side (no torch): manifest, checksums, graph names.

The service refuses a bundle whose manifest or checksums do not hold, naming every file at
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
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """The bundle cannot be served; the message names every problem found."""

    def __init__(self, directory: Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"bundle {directory} refused:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Limits:
    max_source_tokens: int
    max_target_tokens: int
    a: float
    b: float

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

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / self.manifest["tokenizer"]["file"]

    def sha256(self, name: str) -> str:
        return str(self.manifest["files"][name]["sha256"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    required = ("format", "format_version", "model", "tokenizer", "limits", "onnx", "files")
    problems = [f"{MANIFEST} lacks {k!r}" for k in required if k not in manifest]
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
    problems += [f"{name}: used but not listed in {MANIFEST}" for name in used if name not in files]
    for name, entry in sorted(files.items()):
        f = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name}: file names must stay inside the bundle")
        elif not f.is_file():
            problems.append(f"{name}: missing")
        elif _sha256(f) != entry.get("sha256"):
            problems.append(f"{name}: sha256 does not match {MANIFEST} (corrupt or replaced)")
    if problems:
        raise BundleError(root, problems)
    return Bundle(root, manifest)
