"""Write the stage table of ARCHITECTURE.md from the registry (`fv_remote.stages.STAGES`); `--check` only compares."""

from __future__ import annotations

import sys
from pathlib import Path

BEGIN, END = "<!-- stages:begin -->", "<!-- stages:end -->"
DOC = Path(__file__).resolve().parents[1] / "ARCHITECTURE.md"


def render() -> str:
    from fv_remote.stages import stage_table

    rows = ["| stage | class (module) | plan | no-wait | cost model | what it does |", "|---|---|---|---|---|---|"]
    for r in stage_table():
        rows.append(f"| `{r['stage']}` | `{r['class']}` (`{r['module']}`) | `{r['plan']}` | {r['no-wait']} | "
                    f"{r['cost']} | {r['about']} |")
    return "\n".join(rows)


def updated(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render()}\n{END}{tail}"


def main() -> int:
    text = DOC.read_text()
    new = updated(text)
    if "--check" in sys.argv:
        if new != text:
            print("ARCHITECTURE.md's stage table is out of date: run `make docs`")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
