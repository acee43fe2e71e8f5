"""The import graph of the installed `fv_remote` package, from the source files (fv_remote is never imported).

    python tools/import_graph.py [--svg docs/import_graph.svg] [--json FILE]      (`make import-graph`)

grimp reads every `import` statement, at module level or inside a function alike; each import is then classified
here from the file's syntax tree as `top` (runs when the module is imported), `lazy` (inside a function: runs when
the function is called) or `typing` (under `if TYPE_CHECKING:`; never runs). The report gives:

- the longest import chain between modules (every kind of import, and top-level imports only: the depth of an
  `import`),
- the cycles between modules and between subpackages (strongly connected components, with the imports that close
  them),
- the imports that go against `LAYERS` (a lower layer importing a higher one, or one of two independent siblings
  importing the other), each with its file, line and kind.

`LAYERS` is the one declaration of the layer order; `KNOWN_UPWARD` and `KNOWN_CYCLES` are the violations the code
has today. tests/test_import_graph.py fails on any other violation, and on an allowlisted one that is gone (delete
its line then).
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fv_remote"
# Installed package -> its folder in the repository (pyproject.toml's [tool.setuptools.package-dir]).
FOLDERS = {"fv_remote": "fv_remote", "fv_remote.traces": "traces", "fv_remote.cli": "cli"}

# Subpackages, highest first. Each layer may import the layers below it, never one above; `a | b` are independent
# siblings (neither imports the other). The root module `fv_remote` (the facade: lazy re-exports and __version__)
# sits above everything.
LAYERS = [
    "cli",                     # the Typer app: options -> library calls, tables, progress
    "stages",                  # the stage registry (fv_remote.stages): every stage, registered once; job fetch
    "grafting | export",       # weight grafting (local) | llama.cpp control vectors from FVs, FFVs, CFVs, banks
    "relational | baselines",  # FFVs, banks, decoding, alignment, analogies | task vectors, ICV, mean-diff, PCA
    "fv",                      # head stages (extract, CMA, scores), vectors, steering, evaluation, the pipeline
    "plan",                    # what the stages' cost models share: sizes from a config, forwards, limits, verdict
    "execution",               # where a stage runs: Stage, executors (Local, DryRun, NDIF), no-wait jobs
    "models | data | store",   # model loading + adapters | relations + prompts | the Zarr activation store
    "core | traces",           # errors, progress, checks, plots, version | code that runs inside a trace (sandbox)
]

# Known violations, kept until the code changes (issue 23). Each entry is (importer, imported) between modules.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
# Known module cycles, as the imports that close them (fnmatch patterns): with these cut the graph has no cycle.
KNOWN_CYCLE_IMPORTS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    kind: str  # top | lazy | typing

    def where(self) -> str:
        return f"{self.importer}:{self.line} ({self.kind})"


@dataclass
class Graph:
    modules: dict[str, Path]          # module -> source file
    imports: list[Import]             # one per import statement line

    def edges(self, kinds: tuple[str, ...] = ("top", "lazy", "typing")) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {m: set() for m in self.modules}
        for imp in self.imports:
            if imp.kind in kinds:
                out[imp.importer].add(imp.imported)
        return out


def subpackage(module: str) -> str:
    """`fv_remote.fv.cma` -> `fv`; the root module -> `fv_remote`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def layer_index() -> dict[str, tuple[int, int]]:
    """subpackage -> (height, sibling): height 0 is the lowest layer."""
    index = {PACKAGE: (len(LAYERS), 0)}
    for height, layer in enumerate(reversed(LAYERS)):
        for sibling, name in enumerate(part.strip() for part in layer.split("|")):
            index[name] = (height, sibling)
    return index


# --- building the graph ---------------------------------------------------------------------------------------

def _installed_layout(dest: Path) -> None:
    """The package as pip installs it (traces/ and cli/ inside fv_remote/), copied under `dest`."""
    for package, folder in FOLDERS.items():
        target = dest.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "cli", "traces")
                        if package == PACKAGE else shutil.ignore_patterns("__pycache__", "*.pyc"))


def _kinds(path: Path) -> dict[int, str]:
    """line -> kind of the import statement that starts there."""
    kinds: dict[int, str] = {}

    def handle(node: ast.AST, kind: str) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            kinds[node.lineno] = kind
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            walk(node, "lazy" if kind == "top" else kind)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                handle(sub, "typing")
            for sub in node.orelse:
                handle(sub, kind)
        else:
            walk(node, kind)

    def walk(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            handle(child, kind)

    walk(ast.parse(path.read_text(encoding="utf-8")), "top")
    return kinds


def build() -> Graph:
    import grimp

    with tempfile.TemporaryDirectory() as tmp:
        _installed_layout(Path(tmp))
        sys.path.insert(0, tmp)
        saved = {name: mod for name, mod in sys.modules.items() if name == PACKAGE or name.startswith(PACKAGE + ".")}
        for name in saved:
            del sys.modules[name]
        try:
            graph = grimp.build_graph(PACKAGE, cache_dir=None)
            modules = {module: source_file(module) for module in graph.modules}
            imports = []
            for importer in sorted(graph.modules):
                kinds = _kinds(modules[importer])
                for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                    for detail in graph.get_import_details(importer=importer, imported=imported):
                        line = detail["line_number"]
                        imports.append(Import(importer, imported, line, kinds.get(line, "top")))
        finally:
            sys.path.remove(tmp)
            sys.modules.update(saved)
    return Graph(modules, sorted(set(imports), key=lambda i: (i.importer, i.line, i.imported)))


def source_file(module: str) -> Path:
    """The repository file that defines `module`."""
    package = next(p for p in sorted(FOLDERS, key=len, reverse=True) if module == p or module.startswith(p + "."))
    base = ROOT.joinpath(FOLDERS[package], *module.split(".")[len(package.split(".")):])
    return base / "__init__.py" if (base / "__init__.py").is_file() else base.with_suffix(".py")


# --- analysis -------------------------------------------------------------------------------------------------

def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (or a self-import), each sorted; Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(found)


def shortest_cycle(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest cycle through the component's first node, as a closed chain (first == last)."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(parent[chain[-1]])
                    return [start] + chain[::-1][1:] + [start] if len(chain) > 1 else [start, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def _shortest_path(edges: dict[str, set[str]], start: str, goal: str, within: set[str]) -> list[str]:
    """A shortest import chain from `start` to `goal` through the modules `within` (breadth first)."""
    parent = {start: start}
    frontier = [start]
    while frontier and goal not in parent:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & within):
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    chain = [goal]
    while chain[-1] != start:
        chain.append(parent[chain[-1]])
    return chain[::-1]


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    """The longest import chain of distinct modules. Exact on an acyclic graph; a cycle's modules are contracted
    to one node first (the longest simple path is NP-hard in general), and where the chain passes through a cycle
    it is expanded by the shortest path between the member it enters at and the member it leaves from."""
    comps = cycles(edges)
    comp_of = {m: i for i, c in enumerate(comps) for m in c}

    def node(m: str) -> str:
        return f"#{comp_of[m]}" if m in comp_of else m

    dag: dict[str, set[str]] = {node(v): set() for v in edges}
    for v, ws in edges.items():
        dag[node(v)].update(node(w) for w in ws if node(w) != node(v))
    best: dict[str, list[str]] = {}

    def from_node(v: str) -> list[str]:
        if v not in best:
            best[v] = [v] + max((from_node(w) for w in sorted(dag[v])), key=len, default=[])
        return best[v]

    contracted = max((from_node(v) for v in sorted(dag)), key=len, default=[])
    chain: list[str] = []
    for i, v in enumerate(contracted):
        if not v.startswith("#"):
            chain.append(v)
            continue
        members = set(comps[int(v[1:])])
        entry = min(m for m in members if not chain or m in edges[chain[-1]])
        nxt = contracted[i + 1] if i + 1 < len(contracted) else None
        exit_ = entry if nxt is None else min(m for m in members if any(node(w) == nxt for w in edges[m]))
        chain += _shortest_path(edges, entry, exit_, members)
        if nxt is not None and nxt.startswith("#"):
            raise AssertionError("two cycles in a row are one strongly connected component")
    return chain


@dataclass
class Report:
    n_modules: int
    n_imports: dict[str, int]                 # kind -> import statements between fv_remote modules
    longest: list[str]                        # every kind of import
    longest_top: list[str]                    # top-level imports only
    module_cycles: list[list[str]]            # with every import
    cycle_chains: list[list[str]]             # one shortest cycle per component
    new_cycles: list[list[str]]               # those left once KNOWN_CYCLE_IMPORTS are cut
    stale_cycle_imports: list[tuple[str, str]]  # allowlisted imports that no longer close a cycle
    package_cycles: list[list[str]]
    package_cycle_imports: list[Import]       # the cross-package imports inside package cycles
    upward: list[Import]
    lazy_cross: list[Import]                  # lazy imports between subpackages

    def unknown_upward(self) -> list[Import]:
        return [i for i in self.upward if (i.importer, i.imported) not in KNOWN_UPWARD]

    def stale_upward(self) -> list[tuple[str, str]]:
        seen = {(i.importer, i.imported) for i in self.upward}
        return sorted(set(KNOWN_UPWARD) - seen)

    def as_json(self) -> dict:
        def imp(i: Import) -> dict:
            return {"importer": i.importer, "imported": i.imported, "line": i.line, "kind": i.kind}

        return {"modules": self.n_modules, "imports": self.n_imports, "layers": LAYERS,
                "longest_chain": {"length": len(self.longest) - 1, "chain": self.longest},
                "longest_top_level_chain": {"length": len(self.longest_top) - 1, "chain": self.longest_top},
                "module_cycles": [{"modules": c, "shortest": ch} for c, ch in zip(self.module_cycles,
                                                                                   self.cycle_chains)],
                "new_module_cycles": self.new_cycles, "package_cycles": self.package_cycles,
                "package_cycle_imports": [imp(i) for i in self.package_cycle_imports],
                "upward_imports": [imp(i) | {"known": (i.importer, i.imported) in KNOWN_UPWARD}
                                   for i in self.upward],
                "lazy_imports_between_subpackages": [imp(i) for i in self.lazy_cross]}


def is_upward(importer: str, imported: str) -> bool:
    """True where `importer`'s subpackage may not import `imported`'s under LAYERS."""
    index = layer_index()
    a, b = subpackage(importer), subpackage(imported)
    if a == b:
        return False
    (ha, sa), (hb, sb) = index[a], index[b]
    return hb > ha or (ha == hb and sa != sb)


def _known_cycle_import(importer: str, imported: str) -> bool:
    return any(fnmatch(importer, a) and fnmatch(imported, b) for a, b in KNOWN_CYCLE_IMPORTS)


def analyse(graph: Graph) -> Report:
    known = set(layer_index())
    missing = sorted({subpackage(m) for m in graph.modules} - known)
    if missing:
        raise SystemExit(f"subpackages missing from LAYERS in {__file__}: {', '.join(missing)}")
    edges = graph.edges()
    module_cycles = cycles(edges)
    cut = {v: {w for w in ws if not _known_cycle_import(v, w)} for v, ws in edges.items()}
    in_cycle = {m: i for i, c in enumerate(module_cycles) for m in c}
    stale = [(a, b) for a, b in KNOWN_CYCLE_IMPORTS
             if not any(fnmatch(v, a) and fnmatch(w, b) and in_cycle.get(v, -1) == in_cycle.get(w, -2)
                        for v, ws in edges.items() for w in ws)]
    packages: dict[str, set[str]] = {}
    for imp in graph.imports:
        a, b = subpackage(imp.importer), subpackage(imp.imported)
        packages.setdefault(a, set())
        packages.setdefault(b, set())
        if a != b:
            packages[a].add(b)
    package_cycles = cycles(packages)
    pkg_cycle = {p: i for i, c in enumerate(package_cycles) for p in c}
    cycle_imports = [i for i in graph.imports if subpackage(i.importer) != subpackage(i.imported)
                     and pkg_cycle.get(subpackage(i.importer), -1) == pkg_cycle.get(subpackage(i.imported), -2)]
    n_imports = {kind: sum(i.kind == kind for i in graph.imports) for kind in ("top", "lazy", "typing")}
    return Report(
        n_modules=len(graph.modules), n_imports=n_imports,
        longest=longest_chain(edges), longest_top=longest_chain(graph.edges(("top",))),
        module_cycles=module_cycles, cycle_chains=[shortest_cycle(edges, c) for c in module_cycles],
        new_cycles=cycles(cut), stale_cycle_imports=stale,
        package_cycles=package_cycles, package_cycle_imports=cycle_imports,
        upward=[i for i in graph.imports if is_upward(i.importer, i.imported)],
        lazy_cross=[i for i in graph.imports
                    if i.kind == "lazy" and subpackage(i.importer) != subpackage(i.imported)])


def print_report(report: Report) -> None:
    n = report.n_imports
    print(f"{report.n_modules} modules; {sum(n.values())} import statements between them "
          f"({n['top']} top-level, {n['lazy']} lazy inside functions, {n['typing']} under TYPE_CHECKING)")
    print(f"layers, high to low: {'  >  '.join(LAYERS)}")
    print(f"\nlongest import chain ({len(report.longest) - 1} imports, any kind):\n  " + " -> ".join(report.longest))
    print(f"longest top-level chain ({len(report.longest_top) - 1} imports, what one `import` runs):\n  "
          + " -> ".join(report.longest_top))
    print(f"\nmodule cycles: {len(report.module_cycles)} "
          f"({len(report.new_cycles)} left with KNOWN_CYCLE_IMPORTS cut)")
    for component, chain in zip(report.module_cycles, report.cycle_chains):
        print(f"  {len(component)} modules ({', '.join(m.rsplit('.', 1)[-1] for m in component)}); shortest: "
              + " -> ".join(chain))
    for component in report.new_cycles:
        print("  [NEW] " + " <-> ".join(component))
    for a, b in report.stale_cycle_imports:
        print(f"  [gone] {a} -> {b}: remove it from KNOWN_CYCLE_IMPORTS")
    print(f"subpackage cycles: {len(report.package_cycles)}")
    for component in report.package_cycles:
        print("  " + " <-> ".join(component) + ", through the imports that go against LAYERS (below)")
    print(f"\nupward imports (against LAYERS): {len(report.upward)} "
          f"({len(report.unknown_upward())} not in KNOWN_UPWARD)")
    for imp in report.upward:
        label = "known" if (imp.importer, imp.imported) in KNOWN_UPWARD else "NEW"
        print(f"  [{label}] {imp.where()} -> {imp.imported}")
    for pair in report.stale_upward():
        print(f"  [gone] {pair[0]} -> {pair[1]}: remove it from KNOWN_UPWARD")
    library = [i for i in report.lazy_cross if subpackage(i.importer) != "cli"]
    print(f"\nlazy imports between subpackages: {len(report.lazy_cross)} "
          f"({len(report.lazy_cross) - len(library)} in cli, which imports the library on demand; the rest:)")
    for imp in library:
        print(f"  {imp.where()} -> {imp.imported}")


# --- the picture ----------------------------------------------------------------------------------------------

def draw(graph: Graph, report: Report, path: Path) -> None:
    """Subpackages as boxes in their layers (highest on top), one arrow per importing pair of subpackages: width
    by the number of import statements, dashed where all of them are lazy, red where the pair goes against LAYERS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "fv-remote", "svg.fonttype": "none", "font.family": "DejaVu Sans"})
    rows = [[PACKAGE]] + [[p.strip() for p in layer.split("|")] for layer in LAYERS]
    sizes: dict[str, int] = {}
    for m in graph.modules:
        sizes[subpackage(m)] = sizes.get(subpackage(m), 0) + 1
    pos: dict[str, tuple[float, float]] = {}
    singles = 0
    for r, row in enumerate(rows):
        for c, name in enumerate(row):
            x = (c - (len(row) - 1) / 2) * 3.4
            if len(row) == 1 and 0 < r:  # one-package layers zig-zag, so arrows that skip a layer stay apart
                x, singles = (-1.9 if singles % 2 else 1.9) if r > 1 else 0.0, singles + (r > 1)
            pos[name] = (x + (3.4 if r == 0 else 0.0), -r * 1.3)
    pairs: dict[tuple[str, str], list[Import]] = {}
    for imp in graph.imports:
        a, b = subpackage(imp.importer), subpackage(imp.imported)
        if a != b:
            pairs.setdefault((a, b), []).append(imp)
    from_cli = sorted(b for a, b in pairs if a == "cli")
    pairs = {k: v for k, v in pairs.items() if k[0] != "cli"}
    fig, ax = plt.subplots(figsize=(10, 11))
    for (a, b), imps in sorted(pairs.items()):
        upward = is_upward(imps[0].importer, imps[0].imported)
        lazy = all(i.kind != "top" for i in imps)
        ax.annotate("", xy=pos[b], xytext=pos[a], zorder=1,
                    arrowprops=dict(arrowstyle="-|>", lw=0.6 + 0.5 * min(len(imps), 12) ** 0.5,
                                    color="#d62728" if upward else "#1f77b4",
                                    alpha=0.9 if upward else 0.55, linestyle="--" if lazy else "-",
                                    shrinkA=18, shrinkB=18, connectionstyle="arc3,rad=0.12"))
        if upward:
            at = (0.6 * pos[a][0] + 0.4 * pos[b][0], 0.6 * pos[a][1] + 0.4 * pos[b][1])
            ax.text(at[0] + 0.12, at[1], str(len(imps)), color="#d62728", fontsize=9, zorder=3)
    for name, (x, y) in pos.items():
        label = f"{name}\n(facade)" if name == PACKAGE else f"{name}\n{sizes.get(name, 0)} modules"
        ax.text(x, y, label, ha="center", va="center", fontsize=11, zorder=2,
                bbox=dict(boxstyle="round,pad=0.45", fc="#fff8dc" if name == PACKAGE else "#eef3fb", ec="#555"))
    for r in range(1, len(rows)):
        ax.text(-7.3, -r * 1.3, f"layer {len(rows) - 1 - r}", fontsize=8, color="#777", va="center")
    n = report.n_imports
    ax.set_title(f"fv_remote: imports between subpackages ({report.n_modules} modules, {sum(n.values())} import "
                 f"statements)\nan arrow: importer -> imported, width by count; red: against the layer order "
                 f"(count); dashed: lazy imports only\ncli imports {', '.join(from_cli)} (not drawn)",
                 fontsize=10)
    ax.set_xlim(-7.5, 7.5)
    ax.set_ylim(-(len(rows) - 1) * 1.3 - 0.8, 0.8)
    ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", metadata={"Date": None} if path.suffix == ".svg" else {"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the picture (.svg or .png)")
    parser.add_argument("--json", type=Path, help="the report as JSON")
    args = parser.parse_args(argv)
    graph = build()
    report = analyse(graph)
    print_report(report)
    if args.out:
        draw(graph, report, args.out)
        print(f"\npicture: {args.out}")
    if args.json:
        args.json.write_text(json.dumps(report.as_json(), indent=1) + "\n")
    bad = (report.unknown_upward() or report.stale_upward() or report.new_cycles or report.stale_cycle_imports)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
