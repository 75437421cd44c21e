"""The demo's ending: the drain timeline as ``spotguard status`` prints it, what the clients received, where
the snapshot, the logs and the timeline picture are, and one summary line counted from the clients."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spotguard.demo.scenario import Run
from spotguard.demo.traffic import summary_line


def manifests(store: Path) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, json.loads(path.read_text())) for path in sorted(store.rglob("manifest.json"))]


def _snapshot_lines(run: Run) -> list[str]:
    if run.node is None:
        return []
    found = manifests(run.node.store)
    if not found:
        return [f"snapshot:  none written in {run.node.store}"]
    lines = []
    for path, manifest in found:
        kinds = Counter(str(o.get("kind")) for o in manifest.get("objects", []))
        shown = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no objects"
        state = "complete" if manifest.get("complete") else "incomplete"
        lines.append(f"snapshot:  {path} ({state}: {manifest.get('requests', 0)} in-flight request(s) saved; "
                     f"objects: {shown})")
    return lines


def report(run: Run, say: Callable[[str], None]) -> str:
    """Print the ending; returns the summary line (printed last)."""
    say("\n== the drain, as `spotguard status --svg` shows it ==")
    say(run.status_text.rstrip())
    say("\n== what the clients received ==")
    for answer in run.answers:
        kind = "streaming" if answer.ask.stream else "non-streaming"
        late = (" - finished by replica 2 after this node's deadline (resumed by spotguard.client)"
                if run.vm_gone_at and answer.finished_after(run.vm_gone_at) else "")
        say(f"  {answer.ask.name:<12} {kind:<14} {answer.outcome()}{late}")
    if any("interrupted_for_migration" in a.error for a in run.answers):
        say("  (cut when no peer could take it over: its output so far is in the snapshot, and `spotguard resume` "
            "continues it on another replica)")
    if run.after_notice:
        say(f"  (a request sent after the notice got {run.after_notice}; not counted: it was never in flight)")
    say(f"\nwebhooks:  {len(run.webhooks)} received by the local receiver")
    for text in run.webhooks:
        say(f"  {text[:150]}")
    if run.group is not None:
        held = ", ".join(run.registered_after or []) or "nobody"
        say(f"ELBv2:     target group {run.group.arn.rsplit(':', 1)[-1]} on moto holds {held} after the drain")
    elif run.no_group:
        say(f"ELBv2:     none ({run.no_group})")
    for line in _snapshot_lines(run):
        say(line)
    logs = run.workdir / "logs"
    names = sorted(p.name for p in logs.glob("*.log"))
    say(f"logs:      {logs}/ ({', '.join(names)}) and {run.workdir / 'state' / 'gate.log'}")
    if run.svg is not None:
        say(f"picture:   {run.svg}")
    if run.node is not None:
        say(f"config:    {run.node.config}")
    line = summary_line(run.answers, run.engine_note, vm_gone_at=run.vm_gone_at)
    say(line)
    return line
