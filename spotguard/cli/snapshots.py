"""The snapshot commands: snapshots list/show/get, and resume (replay a snapshot on another server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from spotguard.cli.common import ConfigOpt, UnauthOpt, fail, load_config, run_async

snapshots_app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False,
                            help="List, inspect and download snapshots of in-flight work.")


def _trust_note(snap: Any) -> None:
    """Say on stderr when what was read could not be authenticated."""
    if not snap.trust.authenticated:
        typer.echo(f"spotguard: warning: {snap.url}: not authenticated: {snap.trust.note}", err=True)


def _store(cfg: Any) -> tuple[Any, Any]:
    from spotguard.storage import crypto
    from spotguard.storage.store import StoreOptions

    key = crypto.load_key(cfg.snapshot.encryption_key_file) if cfg.snapshot.encryption_key_file else None
    return StoreOptions.from_config(cfg.snapshot), key


@snapshots_app.command("list")
def snapshots_list(config: ConfigOpt = None,
                   url: Annotated[str | None, typer.Option(help="Store URL; default [snapshot] url.")] = None) -> None:  # noqa: UP007
    """List the snapshots under the store URL (those without a manifest are incomplete)."""
    from spotguard.storage.names import shown
    from spotguard.storage.reader import list_snapshots

    cfg = load_config(config)
    target = url or cfg.snapshot.url
    if not target:
        fail("no store: pass --url or set [snapshot] url")
    options, _ = _store(cfg)
    found = run_async(lambda: list_snapshots(target, options))
    for snap in found:
        state = (f"UNREADABLE ({shown(snap.error, 300)})" if snap.error
                 else "complete" if snap.has_manifest else "INCOMPLETE (no manifest)")
        typer.echo(f"{shown(snap.url, 400)}  objects={snap.objects} bytes={snap.bytes} {state}")


@snapshots_app.command("show")
def snapshots_show(snapshot_url: str, config: ConfigOpt = None, allow_unauthenticated: UnauthOpt = False) -> None:
    """Print a snapshot's manifest (objects, sizes, hashes, what was skipped, timings)."""
    from spotguard.storage.reader import open_snapshot

    cfg = load_config(config)
    options, key = _store(cfg)
    snap = run_async(lambda: open_snapshot(snapshot_url, options, key=key, allow_unauthenticated=allow_unauthenticated))
    _trust_note(snap)
    doc = json.loads(snap.manifest.to_json())
    if snap.manifest.authentication:
        doc["authentication"] = snap.manifest.authentication
    typer.echo(json.dumps(doc, indent=2, sort_keys=True))


@snapshots_app.command("get")
def snapshots_get(snapshot_url: str, directory: Path, config: ConfigOpt = None,
                  allow_unauthenticated: UnauthOpt = False) -> None:
    """Download (and decrypt) every object of a snapshot under DIRECTORY, checking each hash.

    A snapshot that names any object outside itself is refused whole, before anything is written.
    """
    from spotguard.storage.reader import open_snapshot

    cfg = load_config(config)
    options, key = _store(cfg)

    async def fetch() -> list[Path]:
        snap = await open_snapshot(snapshot_url, options, key=key, allow_unauthenticated=allow_unauthenticated)
        _trust_note(snap)
        return await snap.download(str(directory))

    written = run_async(fetch)
    for path in written:
        typer.echo(str(path))


def resume(snapshot_url: str, config: ConfigOpt = None,
           to: Annotated[str, typer.Option("--to", help="Base URL of the OpenAI-compatible server to resume on.")] = "",
           engine: Annotated[str, typer.Option(help="openai, vllm or llamacpp.")] = "openai",
           slot_dir: Annotated[str | None, typer.Option(help="Target llama-server's --slot-save-path.")] = None,  # noqa: UP007
           model: Annotated[Path | None, typer.Option(  # noqa: UP007
               help="The target's model file: its sha256 must equal the snapshot's before KV slots are restored "
                    "(default [snapshot] model_path).")] = None,
           model_sha256: Annotated[str, typer.Option(help="The target model's sha256, instead of hashing --model.")] = "",
           max_tokens: Annotated[int | None, typer.Option(help="Most tokens each continuation may add.")] = None,  # noqa: UP007
           jsonl: Annotated[str | None, typer.Option(  # noqa: UP007
               help="Write one JSON object per record (id, ok, text, kv_restored, cache_n, error, kv_note) to this "
                    "file, or - for stdout, instead of printing the continuations.")] = None,
           allow_unauthenticated: UnauthOpt = False) -> None:
    """Replay a snapshot's in-flight requests to another server so each answer continues where it stopped.

    Prints each record's outcome and the text the target produced, or writes them as JSON Lines (--jsonl).
    """
    from spotguard.storage.model_hash import sha256_file
    from spotguard.storage.names import shown
    from spotguard.storage.resume import resume as replay

    if not to:
        fail("--to URL is required")
    if engine not in ("openai", "vllm", "llamacpp"):
        fail("--engine must be openai, vllm or llamacpp")
    cfg = load_config(config)
    options, key = _store(cfg)
    model_hash = model_sha256.strip().lower()
    model_file = str(model) if model is not None else cfg.snapshot.model_path
    if not model_hash and model_file and engine == "llamacpp" and slot_dir:
        try:
            model_hash = sha256_file(model_file)
        except OSError as exc:
            fail(f"--model {model_file}: cannot be read: {exc.strerror}")
    out = None
    if jsonl not in (None, "-"):
        try:
            out = open(jsonl, "w", encoding="utf-8")  # noqa: SIM115 - closed below, after the replay
        except OSError as exc:
            fail(f"--jsonl {jsonl}: cannot be written: {exc.strerror}")
    try:
        results = run_async(lambda: replay(snapshot_url, to, engine=engine, slot_dir=slot_dir,  # type: ignore[arg-type]
                                      options=options, key=key, model_sha256=model_hash, max_tokens=max_tokens,
                                      allow_unauthenticated=allow_unauthenticated, opened=_trust_note))
        for result in results:
            status = "ok" if result.ok else "FAILED " + shown(result.error, 500)
            summary = (f"{result.id}: {status} kv_restored={result.kv_restored} cache_n={result.cache_n}"
                       + (f" (kv not restored: {result.kv_note})" if result.kv_note else ""))
            if jsonl is None:
                typer.echo(f"== {summary}")
                if result.text:
                    # The text answers a prompt read from the store: control characters escaped, lines kept.
                    typer.echo("\n".join(shown(line, len(line)) for line in result.text.split("\n")))
                continue
            typer.echo(summary, err=True)
            line = json.dumps(result.to_json(), ensure_ascii=False)
            if out is None:
                typer.echo(line)
            else:
                out.write(line + "\n")
    finally:
        if out is not None:
            out.close()
    raise typer.Exit(0 if all(r.ok for r in results) else 1)
