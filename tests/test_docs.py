"""The README documents every serve setting and every file a bundle may hold."""

from __future__ import annotations

from pathlib import Path

from service.bundle import GRAPH_FILES, graph_io
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


def _readme_io(graph_file: str) -> dict[str, set[str]]:
    """The input and output names the README's table for one graph lists, for one layer."""
    section = README.split(f"### {graph_file}", 1)[1].split("\n### ", 1)[0]
    names: dict[str, set[str]] = {"inputs": set(), "outputs": set()}
    for line in section.splitlines():
        cell = (
            line.split("|")[1].strip()
            if line.startswith("| in ") or line.startswith("| out ")
            else ""
        )
        if not cell:
            continue
        kind = "inputs" if cell.startswith("in ") else "outputs"
        last = ""
        for quoted in cell.split("`")[1::2]:  # `a`, `b` or `….key`, `.value`
            name = last.rsplit(".", 1)[0] + quoted if quoted.startswith(".") else quoted
            names[kind].add(last := name.replace("{i}", "0"))
    return names


def test_the_readme_graph_tables_match_the_bundle_contract() -> None:
    """README's input/output tables name exactly the contract's names (service.bundle's
    GraphIO, which the exporter writes into every manifest and the runtime checks)."""
    contract = graph_io(1).manifest()
    for part, graph_file in GRAPH_FILES["fp32"].items():
        want = {k: set(v) for k, v in contract[part].items()}
        assert _readme_io(graph_file) == want, graph_file
