"""The README documents every serve setting and every file a bundle may hold."""

from __future__ import annotations

from pathlib import Path

from service.bundle import GRAPH_FILES
from service.server import SETTINGS
from service.settings import flag, flags_of

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_every_serve_setting_is_in_the_readme() -> None:
    missing = [f.name for cls in SETTINGS for f in flags_of(cls) if flag(f.name) not in README]
    assert not missing, f"serve settings missing from the README: {missing}"
    assert "NMTSERVE_<FLAG>" in README  # the rule that names each one's environment variable


def test_every_bundle_graph_is_in_the_readme() -> None:
    names = {n for graphs in GRAPH_FILES.values() for n in graphs.values()}
    missing = sorted(n for n in names if n not in README)
    assert not missing, f"bundle files missing from the README: {missing}"
