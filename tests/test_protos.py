"""The committed generated code equals what protoc makes from protos/ now."""

from __future__ import annotations

from pathlib import Path

from service.protogen import OUT, generate


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in generate(tmp_path)}
    committed = {
        p.relative_to(OUT): p.read_bytes()
        for p in OUT.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh) == sorted(committed), "run: python -m service.protogen"
    stale = [str(k) for k in fresh if fresh[k] != committed[k]]
    assert stale == [], f"stale generated code {stale}; run: python -m service.protogen"
