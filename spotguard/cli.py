"""The ``spotguard`` command line. Heavy imports happen inside commands so ``spotguard status`` stays quick."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

from spotguard import __version__
from spotguard.errors import SpotguardError


class _PlainHelp(TyperGroup):
    """Help that reads like a command line: a flag takes no value, a value option names its value.

    Typer's rich help prints a type after every option (``--dry-run <bool>``, ``--to <str>``), which
    reads as if a flag took a value; so help is plain (``rich_markup_mode=None``, inherited by every
    subcommand) and an option without an explicit ``metavar=`` shows its own name (``--to TO``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _name_values(self)


def _name_values(command: Any) -> None:
    for param in command.params:
        if param.param_type_name == "option" and param.metavar is None and not param.is_flag and not param.count:
            param.metavar = (param.name or "value").upper()
    for sub in getattr(command, "commands", {}).values():
        _name_values(sub)


# A traceback must never print local variables: they hold the configuration (webhook URLs with tokens).
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, cls=_PlainHelp,
                  pretty_exceptions_show_locals=False,
                  help="Notices spot/preemptible evictions and drains the local inference server in time.")
config_app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False,
                         help="Inspect the configuration.")
snapshots_app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False,
                            help="List, inspect and download snapshots of in-flight work.")
app.add_typer(config_app, name="config")
app.add_typer(snapshots_app, name="snapshots")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", metavar="FILE", help="TOML config file "  # noqa: UP007
                                                    "(default $SPOTGUARD_CONFIG or /etc/spotguard/spotguard.toml).")]
UnauthOpt = Annotated[bool, typer.Option(
    "--allow-unauthenticated", help="With a key, read a snapshot whose manifest carries no MAC (format version 1, "
                                    "or written without a key): anyone who can write the store could have changed it.")]


T = TypeVar("T")


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"spotguard: {message}", err=True)
    raise typer.Exit(code)


def _load(path: Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> Any:
    from spotguard import config

    try:
        return config.load(path, overrides=overrides)
    except SpotguardError as exc:
        _fail(str(exc))


def _run(call: Callable[[], Awaitable[T]]) -> T:
    """Run an async call to completion; a SpotguardError becomes a one-line message and exit 1."""
    import anyio

    try:
        return anyio.run(call, backend="asyncio")
    except SpotguardError as exc:
        _fail(str(exc), 1)


def _report(doc: dict[str, Any]) -> None:
    """Print a drain/undrain answer; a refused request exits 1."""
    typer.echo(_control_result(doc))
    if not doc.get("accepted", True):
        raise typer.Exit(1)


def _control_result(doc: dict[str, Any]) -> str:
    """What drain/undrain print: the daemon's message, then the timeline when there is one."""
    from spotguard.control import render

    lines = []
    if doc.get("message"):
        lines.append(str(doc["message"]))
    if doc.get("dry_run"):
        lines.append("dry run: nothing was done; each step says what it would do")
    if "state" in doc or "steps" in doc:
        lines.append(render.format_status({"state": doc.get("state", "serving"), "cloud": doc.get("cloud", ""),
                                           "notice": doc.get("notice"), "steps": doc.get("steps", [])}))
    return "\n".join(lines)


def _private_files() -> None:
    """Files, directories and sockets this process creates are its user's alone (state, logs, file://
    snapshots hold prompts), whoever started it with whatever umask; modes set on purpose (the control
    socket's [control] mode) are applied explicitly and are not affected."""
    os.umask(0o077)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"spotguard {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """spotguard: never miss an eviction, never overrun the window, lose no in-flight work."""


@app.command()
def version(config: ConfigOpt = None) -> None:
    """Print the version."""
    typer.echo(f"spotguard {__version__}")


@app.command()
def run(config: ConfigOpt = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Every drain step logs what it would do and does nothing.")] = False,
        listen: Annotated[str | None, typer.Option(metavar="HOST:PORT", help="Override [http] listen.")] = None,  # noqa: UP007
        cloud: Annotated[str | None, typer.Option(metavar="CLOUD", help="Override [agent] cloud "  # noqa: UP007
                                                  "(auto, aws, gcp, azure or none).")] = None) -> None:
    """Run the daemon."""
    from spotguard import logs

    _private_files()
    from spotguard.agent.daemon import run_daemon

    overrides: dict[str, dict[str, Any]] = {}
    if dry_run:
        overrides.setdefault("agent", {})["dry_run"] = True
    if cloud:
        overrides.setdefault("agent", {})["cloud"] = cloud
    if listen:
        overrides.setdefault("http", {})["listen"] = listen
    cfg = _load(config, overrides)
    logs.configure(cfg.agent.log_format, cfg.agent.log_level)
    try:
        code = _run(lambda: run_daemon(cfg))
    except KeyboardInterrupt:
        code = 1
    raise typer.Exit(code)


@app.command()
def gate(config: ConfigOpt = None,
         stop: Annotated[bool, typer.Option("--stop", help="Ask the running gate to stop (it finishes the "
                                                          "requests in flight first, up to [gate] stop_timeout).")] = False,
         uvloop: Annotated[bool, typer.Option("--uvloop/--no-uvloop", help="Run on uvloop when it is installed.")] = True,
         gc_freeze: Annotated[bool, typer.Option("--gc-freeze/--no-gc-freeze", help="Exempt start-up objects from "
                                                 "garbage collection (shorter GC pauses on the data path).")] = True,
         ) -> None:
    """Run the gate (the reverse proxy in front of the engine) as its own process.

    `spotguard run` starts it when none is running ([gate] start = auto); under systemd it is
    spotguard-gate.service. It outlives the daemon: restarting spotguard never cuts a request in flight.
    """
    from spotguard import logs

    _private_files()
    cfg = _load(config)
    if not cfg.gate.listen:
        # Not a failure: spotguard-gate.service is installed everywhere and stays inactive where the gate is off.
        typer.echo("spotguard: [gate] listen is empty: the gate is off in this configuration; nothing to run")
        return
    if stop:
        from spotguard.gate.control import call, control_path

        answer = _run(lambda: call(control_path(cfg), "stop", timeout=5.0))
        typer.echo(f"gate stopping ({answer.get('stopping')})")
        return
    if not cfg.gate.upstream:
        _fail("[gate] upstream: set the engine's base URL (e.g. http://127.0.0.1:8080)")
    from spotguard.gate.service import run_gate_process

    logs.configure(cfg.agent.log_format, cfg.agent.log_level)
    if gc_freeze:
        import gc

        # Everything loaded so far lives as long as the process: a full collection need not walk it again
        # (bench/gate.py: the p99 of 200 streams' first bytes with and without).
        gc.collect()
        gc.freeze()
    try:
        code = _run_gate(lambda: run_gate_process(cfg), uvloop)
    except KeyboardInterrupt:
        code = 1
    raise typer.Exit(code)


def _run_gate(call: Callable[[], Awaitable[int]], uvloop: bool) -> int:
    import importlib.util

    import anyio

    options = {"use_uvloop": True} if uvloop and importlib.util.find_spec("uvloop") else {}
    try:
        return anyio.run(call, backend="asyncio", backend_options=options)
    except SpotguardError as exc:
        _fail(str(exc), 1)


@app.command()
def status(config: ConfigOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print the /status document.")] = False,
           svg: Annotated[Path | None, typer.Option(  # noqa: UP007
               "--svg", metavar="FILE", help="Also draw the drain timeline as an SVG picture into FILE.")] = None) -> None:
    """Show the node's state, the notice, and the drain timeline."""
    from spotguard.control import client, render

    cfg = _load(config)
    doc = _run(lambda: client.status(cfg.control.socket, group=cfg.control.group))
    typer.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else render.format_status(doc))
    if svg is not None:
        from spotguard.control.svg import render_svg

        try:
            svg.write_text(render_svg(doc, safety_margin=cfg.drain.safety_margin))
        except OSError as exc:
            _fail(f"--svg {svg}: {exc.strerror or exc}", 1)
        typer.echo(f"timeline picture: {svg}", err=as_json)


@app.command()
def drain(config: ConfigOpt = None,
          reason: Annotated[str, typer.Option(metavar="TEXT", help="Why (shown in status, logs and webhooks).")] = "manual drain",
          deadline: Annotated[float | None, typer.Option(metavar="SECONDS", help="Seconds from now the drain must "  # noqa: UP007
                                                         "end by (default [drain] manual_deadline).")] = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what each step would do.")] = False) -> None:
    """Drain this node now (through the local control socket)."""
    from spotguard.control import client

    cfg = _load(config)

    async def start() -> dict[str, Any]:
        doc = await client.drain(cfg.control.socket, reason=reason, deadline_seconds=deadline, dry_run=dry_run,
                                 group=cfg.control.group)
        if not doc.get("accepted") or dry_run:
            return doc
        # The answer only says the drain began; the status shows the steps it has started since.
        now = await client.status(cfg.control.socket, group=cfg.control.group)
        return {**now, "accepted": True, "message": "drain started; `spotguard status` follows it to the end"}

    _report(_run(start))


@app.command()
def undrain(config: ConfigOpt = None,
            force: Annotated[bool, typer.Option("--force", help="Serve again even while a cloud notice is live.")] = False) -> None:
    """Return to serving after a manual drain."""
    from spotguard.control import client

    cfg = _load(config)
    _report(_run(lambda: client.undrain(cfg.control.socket, force=force)))


@app.command()
def emulate(config: ConfigOpt = None,
            listen: Annotated[str, typer.Option(metavar="HOST:PORT", help="Where to serve AWS, GCP and Azure metadata.")] = "127.0.0.1:8169") -> None:
    """Serve emulated AWS/GCP/Azure metadata with a control API, to rehearse evictions."""
    import anyio

    from spotguard import logs
    from spotguard.config import parse_listen
    from spotguard.emulator.app import run_emulator

    cfg = _load(config)
    logs.configure(cfg.agent.log_format, cfg.agent.log_level)
    host, port = parse_listen(listen, "--listen")

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            bound = await tg.start(lambda task_status: run_emulator(host, port, task_status=task_status))
            typer.echo(f"emulating AWS, GCP and Azure metadata on {bound.url} (control API: {bound.url}/_emulator/)")

    try:
        anyio.run(main, backend="asyncio")
    except KeyboardInterrupt:
        pass


@app.command()
def demo(short: Annotated[bool, typer.Option("--short", help="Fewer, shorter requests and a 30 s notice.")] = False,
         stand_in: Annotated[bool, typer.Option("--stand-in", help="Run the stand-in engine, not llama-server.")] = False,
         no_build: Annotated[bool, typer.Option("--no-build", help="Do not build llama-server when it is not "
                                                "cached (the stand-in runs instead).")] = False,
         workdir: Annotated[Path | None, typer.Option(  # noqa: UP007
             "--workdir", metavar="DIR", help="Where the config, logs, snapshots and picture go "
                                              "(default: a new directory under /tmp).")] = None) -> None:
    """Run a spot eviction on this machine with real parts and no cloud, and show what spotguard did."""
    from spotguard.demo import Options, run_demo

    try:
        run_demo(Options(short=short, llama=not stand_in, build=not no_build, workdir=workdir))
    except KeyboardInterrupt:
        _fail("demo interrupted; every process it started was stopped", 130)
    except Exception as exc:  # noqa: BLE001 - the demo's processes are stopped; say what failed, in one line
        _fail(f"demo failed: {exc}", 1)


@app.command()
def doctor(config: ConfigOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False) -> None:
    """Check the detected cloud, metadata reachability, configuration, NVML and the install."""
    import anyio

    from spotguard.doctor import format_checks, run_checks

    cfg = _load(config)
    checks = anyio.run(run_checks, cfg, backend="asyncio")
    if as_json:
        typer.echo(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        typer.echo(format_checks(checks))
    raise typer.Exit(1 if any(c.level == "error" for c in checks) else 0)


@config_app.command("show")
def config_show(config: ConfigOpt = None,
                doc: Annotated[bool, typer.Option("--doc", help="Print every key with its default and help.")] = False) -> None:
    """Print the effective configuration (file -> environment -> flags) as TOML."""
    from spotguard import config as config_module

    if doc:
        for section, key, kind, default, help_text in config_module.reference():
            typer.echo(f"[{section}] {key} ({kind}, default {default}): {help_text}")
        return
    typer.echo(config_module.to_toml(_load(config)))


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

    cfg = _load(config)
    target = url or cfg.snapshot.url
    if not target:
        _fail("no store: pass --url or set [snapshot] url")
    options, _ = _store(cfg)
    found = _run(lambda: list_snapshots(target, options))
    for snap in found:
        state = (f"UNREADABLE ({shown(snap.error, 300)})" if snap.error
                 else "complete" if snap.has_manifest else "INCOMPLETE (no manifest)")
        typer.echo(f"{shown(snap.url, 400)}  objects={snap.objects} bytes={snap.bytes} {state}")


@snapshots_app.command("show")
def snapshots_show(snapshot_url: str, config: ConfigOpt = None, allow_unauthenticated: UnauthOpt = False) -> None:
    """Print a snapshot's manifest (objects, sizes, hashes, what was skipped, timings)."""
    from spotguard.storage.reader import open_snapshot

    cfg = _load(config)
    options, key = _store(cfg)
    snap = _run(lambda: open_snapshot(snapshot_url, options, key=key, allow_unauthenticated=allow_unauthenticated))
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

    cfg = _load(config)
    options, key = _store(cfg)

    async def fetch() -> list[Path]:
        snap = await open_snapshot(snapshot_url, options, key=key, allow_unauthenticated=allow_unauthenticated)
        _trust_note(snap)
        return await snap.download(str(directory))

    written = _run(fetch)
    for path in written:
        typer.echo(str(path))


@app.command()
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
        _fail("--to URL is required")
    if engine not in ("openai", "vllm", "llamacpp"):
        _fail("--engine must be openai, vllm or llamacpp")
    cfg = _load(config)
    options, key = _store(cfg)
    model_hash = model_sha256.strip().lower()
    model_file = str(model) if model is not None else cfg.snapshot.model_path
    if not model_hash and model_file and engine == "llamacpp" and slot_dir:
        try:
            model_hash = sha256_file(model_file)
        except OSError as exc:
            _fail(f"--model {model_file}: cannot be read: {exc.strerror}")
    out = None
    if jsonl not in (None, "-"):
        try:
            out = open(jsonl, "w", encoding="utf-8")  # noqa: SIM115 - closed below, after the replay
        except OSError as exc:
            _fail(f"--jsonl {jsonl}: cannot be written: {exc.strerror}")
    try:
        results = _run(lambda: replay(snapshot_url, to, engine=engine, slot_dir=slot_dir,  # type: ignore[arg-type]
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


def main() -> None:
    try:
        app()
    except SpotguardError as exc:  # pragma: no cover - commands catch their own
        typer.echo(f"spotguard: {exc}", err=True)
        _exit(2)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            typer.echo(exc.code, err=True)
        _exit(exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1)


def _exit(code: int) -> NoReturn:
    """Leave without the interpreter's teardown, once everything is written and flushed.

    obstore 0.12's runtime threads can abort the process while Python finalises (SIGABRT, exit 134,
    seen in about one exit in three after any store call, with spotguard's code before this change
    too); the command's work and output are complete by then, so the exit code must not be lost to it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
