"""Regenerates the reference parts of docs/operations.md from the code, so they cannot drift.

    python tools/gen_docs.py          rewrite the generated blocks in place
    python tools/gen_docs.py --check  exit 1 (with a diff) when the file is out of date

A block sits between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``; the text
outside the markers is written by hand and left alone.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from spotguard import config
from spotguard.metrics import Metrics

DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED: (?P=name) -->)",
                   re.DOTALL)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    """One table per section: key, type, default, meaning, and the environment variable."""
    lines: list[str] = []
    section = ""
    for name, key, kind, default, help_text in config.reference():
        if name != section:
            if section:
                lines.append("")
            lines += [f"#### `[{name}]`", "", "| key | type | default | environment | meaning |",
                      "|---|---|---|---|---|"]
            section = name
        env = f"{config.ENV_PREFIX}{name.upper()}_{key.upper()}"
        lines.append(f"| `{key}` | {kind} | `{_cell(default)}` | `{env}` | {_cell(help_text)} |")
    return "\n".join(lines) + "\n"


def _exported(metric: MetricWrapperBase) -> tuple[str, str, str]:
    # prometheus_client keeps the family name, type and label names on private attributes; they have
    # been stable for years and there is no public accessor for label names of an unused family.
    kind = str(metric._type)  # noqa: SLF001
    name = str(metric._name)  # noqa: SLF001
    labels = ", ".join(f"`{label}`" for label in metric._labelnames)  # noqa: SLF001
    if kind == "counter":
        name += "_total"
    elif kind == "histogram":
        kind = "histogram (`_bucket`, `_sum`, `_count`)"
    return name, kind, labels or "-"


def metrics_reference() -> str:
    """Every metric the daemon exports: name, type, labels, help."""
    metrics = Metrics()
    rows = sorted(_exported(m) + (m._documentation,)  # noqa: SLF001
                  for m in vars(metrics).values() if isinstance(m, MetricWrapperBase))
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {kind} | {labels} | {_cell(doc)} |" for name, kind, labels, doc in rows]
    return "\n".join(lines) + "\n"


GENERATORS: dict[str, Callable[[], str]] = {"config": config_reference, "metrics": metrics_reference}


def render(text: str) -> str:
    """``text`` with every generated block replaced by fresh output; unknown blocks are an error."""
    seen: set[str] = set()

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in GENERATORS:
            raise SystemExit(f"gen_docs: unknown generated block {name!r}; known: {', '.join(GENERATORS)}")
        seen.add(name)
        return match.group(1) + GENERATORS[name]() + match.group(4)

    result = BLOCK.sub(fill, text)
    missing = set(GENERATORS) - seen
    if missing:
        raise SystemExit(f"gen_docs: {DOC} lacks the generated block(s) {', '.join(sorted(missing))}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the file is out of date")
    parser.add_argument("--path", type=Path, default=DOC)
    args = parser.parse_args(argv)
    current = args.path.read_text()
    fresh = render(current)
    if fresh == current:
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), fresh.splitlines(True),
                                                   str(args.path), "generated"))
        print(f"\n{args.path} is out of date: run python tools/gen_docs.py", file=sys.stderr)
        return 1
    args.path.write_text(fresh)
    print(f"updated {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
