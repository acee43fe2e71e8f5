"""The layer order of fv_remote's subpackages and the absence of import cycles (tools/import_graph.py, grimp).

A failure names the import (file:line) that goes against `LAYERS` or closes a cycle. Known violations are listed in
`KNOWN_UPWARD` / `KNOWN_CYCLE_IMPORTS` there; when one disappears its line must go too (the allowlists only
shrink)."""

from __future__ import annotations


import pytest

from support.tools import load_tool


ig = load_tool("import_graph")


@pytest.fixture(scope="module")
def graph():
    return ig.build()


@pytest.fixture(scope="module")
def report(graph):
    return ig.analyse(graph)


def test_the_graph_holds_every_subpackage(graph):
    packages = {ig.subpackage(m) for m in graph.modules}
    assert {"core", "models", "data", "store", "execution", "fv", "relational", "export", "plan", "grafting",
            "traces", "cli"} <= packages
    assert packages <= set(ig.layer_index())  # every subpackage has a layer (analyse() says which is missing)
    assert len(graph.modules) > 50 and any(i.kind == "lazy" for i in graph.imports)


def test_no_upward_import_outside_the_allowlist(report):
    new = [f"{i.where()} imports {i.imported}" for i in report.unknown_upward()]
    assert not new, "imports against tools/import_graph.py's LAYERS:\n" + "\n".join(new)


def test_no_module_cycle_outside_the_allowlist(report):
    assert not report.new_cycles, f"import cycles between modules: {report.new_cycles}"


def test_allowlists_only_hold_current_violations(report):
    assert not report.stale_upward(), f"no longer imported, remove from KNOWN_UPWARD: {report.stale_upward()}"
    assert not report.stale_cycle_imports, \
        f"no longer closes a cycle, remove from KNOWN_CYCLE_IMPORTS: {report.stale_cycle_imports}"


def test_subpackage_cycles_come_only_from_allowlisted_upward_imports(graph):
    edges: dict[str, set[str]] = {}
    for i in graph.imports:
        a, b = ig.subpackage(i.importer), ig.subpackage(i.imported)
        edges.setdefault(a, set())
        if a != b and (i.importer, i.imported) not in ig.KNOWN_UPWARD:
            edges[a].add(b)
    assert ig.cycles(edges) == []


def test_traces_import_nothing_of_fv_remote(graph):
    """traces/ ships to NDIF's sandbox by source: it may import only its own modules."""
    bad = [i.where() + " -> " + i.imported for i in graph.imports
           if ig.subpackage(i.importer) == "traces" and ig.subpackage(i.imported) != "traces"]
    assert not bad


def test_the_checker_on_a_toy_graph():
    edges = {"a": {"b"}, "b": {"c", "d"}, "c": {"b"}, "d": {"e"}, "e": set(), "f": {"f"}}
    assert ig.cycles(edges) == [["b", "c"], ["f"]]
    assert ig.shortest_cycle(edges, ["b", "c"]) == ["b", "c", "b"]
    assert ig.longest_chain(edges) == ["a", "b", "d", "e"]  # the cycle b<->c is entered and left at b
    assert ig.longest_chain({"x": {"y"}, "y": {"z"}, "z": set()}) == ["x", "y", "z"]
    assert ig.is_upward("fv_remote.execution.jobs", "fv_remote.fv.cma")
    assert ig.is_upward("fv_remote.data.tasks", "fv_remote.store.activations")  # independent siblings
    assert ig.is_upward("fv_remote.fv.vectors", "fv_remote")  # the root facade is the top
    assert not ig.is_upward("fv_remote.fv.cma", "fv_remote.execution")
    assert not ig.is_upward("fv_remote.fv.cma", "fv_remote.fv.cma_methods")


def test_import_kinds_from_the_syntax_tree(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import json\n"
                      "def f():\n    import re\nclass C:\n    import sys\n    def g(self):\n        import ast\n")
    assert ig._kinds(source) == {1: "top", 2: "top", 4: "typing", 6: "lazy", 8: "top", 10: "lazy"}
