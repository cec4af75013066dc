"""The model bundle: the one thing that crosses from export/ to service/.

A directory holding the ONNX graphs, the tokenizer model and ``manifest.json``. The manifest
records the format version, hyper-parameters, special ids, length limits, opset, the sha256 of
every file, the corpus summary, test metrics, verification results and export settings. The
service refuses a bundle whose manifest or checksums do not hold.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT = "nmtserve-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
# Graph file names per precision. "decoder_kv" (the decoder over preallocated caches updated in
# place) and "encoder_packed" (the encoder over sentences packed without padding), see
# export.onnx_export, are optional: bundles without them are served with "decoder" and
# "encoder".
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
REQUIRED_KEYS = (
    "format",
    "format_version",
    "model",
    "special_ids",
    "tokenizer",
    "limits",
    "onnx",
    "files",
    "metrics",
    "verification",
)


class BundleError(ValueError):
    """A bundle that does not hold; the message lists every problem found."""

    def __init__(self, bundle: Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"bundle {bundle} is not valid:\n  - " + "\n  - ".join(problems))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {
        n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size}
        for n in sorted(names)
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def check_bundle(directory: Path) -> dict[str, Any]:
    """Reads and checks a bundle: manifest keys and format version, every listed file present
    with its sha256, every graph and the tokenizer listed. Returns the manifest or raises
    BundleError naming every problem."""
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleError(directory, [f"{MANIFEST} is missing"])
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(directory, [f"{MANIFEST} is not valid JSON: {e}"]) from e
    problems = [f"{MANIFEST} lacks the key {k!r}" for k in REQUIRED_KEYS if k not in manifest]
    if problems:
        raise BundleError(directory, problems)
    if manifest["format"] != FORMAT:
        problems.append(f"format is {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        problems.append(
            f"format_version is {manifest['format_version']!r}; this code reads {FORMAT_VERSION}"
        )
    files: dict[str, Any] = manifest["files"]
    needed = [manifest["tokenizer"]["file"]]
    for graphs in manifest["onnx"]["graphs"].values():
        needed += [graphs["encoder"], graphs["decoder"], *graphs.values()]
    problems += [f"{n} is used but not listed in files" for n in needed if n not in files]
    for name, entry in files.items():
        f = directory / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(f) != entry["sha256"]:
            problems.append(f"{name} does not match its sha256 in {MANIFEST}")
    if problems:
        raise BundleError(directory, problems)
    return manifest
