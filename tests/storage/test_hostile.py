"""Snapshots written by an attacker (raw puts to moto S3, which keeps ``..`` and ``//`` keys literally),
read back by the real ``spotguard`` command: every attack refused, nothing written outside the
destination, nothing sent anywhere but ``--to``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import httpx
import pytest

from spotguard import asgi
from spotguard.config import Config
from spotguard.storage import crypto
from tests.storage.conftest import fill_journal, make_ctx, take_snapshot
from tests.storage.hostile import cli, encrypt_v1, entry, manifest, record, s3, write_config
from tests.support.openai_upstream import FakeEngine

pytestmark = pytest.mark.anyio

PREFIX = "spotguard/i-test/evt-1"


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


async def real_snapshot(moto_url: str, bucket: str, *, key_file: Path | None = None, event: str = "evt-1",
                        requests: int = 2) -> None:
    config = Config().replace("snapshot", url=f"s3://{bucket}/spotguard", endpoint_url=moto_url,
                              encryption_key_file=str(key_file) if key_file else "")
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(30):
            await take_snapshot(make_ctx(config, http, fill_journal(requests), event_id=event))


@pytest.mark.parametrize("bad_name", [
    "ABSOLUTE",  # replaced by an absolute path outside the destination
    "../../outside/evil",
    "records/../../../outside/evil",
    "records//000001.jsonl",
    "records/./000001.jsonl",
    "records/000001.jsonl\x1b[2J",
    "records/000001.jsonl\x00.png",
    "kv\\..\\..\\evil",
    "notes/readme.txt",
])
async def test_get_refuses_a_name_outside_the_snapshot_and_writes_nothing(
        moto_url: str, bucket: str, tmp_path: Path, bad_name: str) -> None:
    outside = tmp_path / "outside"
    name = str(outside / "evil") if bad_name == "ABSOLUTE" else bad_name
    await real_snapshot(moto_url, bucket)
    client = s3(moto_url)
    doc = json.loads(client.get_object(Bucket=bucket, Key=f"{PREFIX}/manifest.json")["Body"].read())
    payload = b"pwned\n"
    if "\x00" not in name:
        # The object really exists under that literal key: the reader must refuse the name, not trip over it.
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/{name.lstrip('/')}", Body=payload)
    doc["objects"].append(entry(name, "records", payload))
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/manifest.json", Body=json.dumps(doc).encode())
    config = write_config(tmp_path / "c.toml", endpoint_url=moto_url)
    dest = tmp_path / "dest"
    code, out, err = await cli("snapshots", "get", f"s3://{bucket}/{PREFIX}", str(dest), "--config", str(config))
    assert code != 0
    assert "Traceback" not in err and "object name" in err and "refusing the snapshot" in err
    assert repr(name) in err  # the bad name is in the message, escaped
    assert "\x1b" not in err and "\x00" not in err
    assert files_under(dest) == [] and files_under(outside) == [] and out == ""


async def test_get_never_writes_through_a_symlink_planted_at_the_destination(tmp_path: Path) -> None:
    config = Config().replace("snapshot", url=f"file://{tmp_path}/snaps")
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            await take_snapshot(make_ctx(config, http, fill_journal(2)))
    url = f"file://{tmp_path}/snaps/i-test/evt-1"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "records").symlink_to(outside)  # a directory on the way is a symlink
    code, _, err = await cli("snapshots", "get", url, str(dest), "--config", str(write_config(tmp_path / "c.toml")))
    assert code == 1 and "not a plain directory" in err and "Traceback" not in err
    assert files_under(outside) == ["keep.txt"] and (outside / "keep.txt").read_text() == "precious"

    (dest / "records").unlink()
    (dest / "records").mkdir()
    (dest / "records" / "000000.jsonl").symlink_to(outside / "keep.txt")  # the file itself is a symlink
    code, out, err = await cli("snapshots", "get", url, str(dest), "--config", str(write_config(tmp_path / "c.toml")))
    assert code == 0, err
    assert (outside / "keep.txt").read_text() == "precious"  # replaced the link, did not write through it
    assert not (dest / "records" / "000000.jsonl").is_symlink()
    assert len((dest / "records" / "000000.jsonl").read_text().splitlines()) == 2
    assert "not authenticated" in err  # no key: said so, on stderr


async def test_a_signed_manifest_that_was_changed_is_refused(moto_url: str, bucket: str, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(os.urandom(32))
    await real_snapshot(moto_url, bucket, key_file=key_file)
    client = s3(moto_url)
    raw = client.get_object(Bucket=bucket, Key=f"{PREFIX}/manifest.json")["Body"].read()
    config = write_config(tmp_path / "c.toml", endpoint_url=moto_url, encryption_key_file=str(key_file))
    url = f"s3://{bucket}/{PREFIX}"

    code, out, err = await cli("snapshots", "show", url, "--config", str(config))
    assert code == 0 and json.loads(out)["authentication"]["algorithm"] == "HMAC-SHA256" and err == ""

    doc = json.loads(raw)
    doc["requests"] = 999
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/manifest.json", Body=json.dumps(doc).encode())
    code, _, err = await cli("snapshots", "get", url, str(tmp_path / "d1"), "--config", str(config))
    assert code == 1 and "does not verify" in err and files_under(tmp_path / "d1") == []

    doc = json.loads(raw)
    del doc["authentication"]  # stripped: looks like a snapshot written without a key
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/manifest.json", Body=json.dumps(doc).encode())
    code, _, err = await cli("snapshots", "get", url, str(tmp_path / "d2"), "--config", str(config))
    assert code == 1 and "not authenticated" in err and "--allow-unauthenticated" in err
    assert files_under(tmp_path / "d2") == []
    code, _, err = await cli("snapshots", "get", url, str(tmp_path / "d3"), "--config", str(config),
                             "--allow-unauthenticated")
    assert code == 0 and "warning" in err and files_under(tmp_path / "d3") == ["records", "records/000000.jsonl"]


async def test_objects_cannot_move_between_snapshots(moto_url: str, bucket: str, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(os.urandom(32))
    await real_snapshot(moto_url, bucket, key_file=key_file, event="evt-1", requests=2)
    await real_snapshot(moto_url, bucket, key_file=key_file, event="evt-2", requests=3)
    client = s3(moto_url)
    config = write_config(tmp_path / "c.toml", endpoint_url=moto_url, encryption_key_file=str(key_file))
    other = "spotguard/i-test/evt-2"
    # The whole signed snapshot copied over another one: its manifest names evt-2, not this place.
    for name in ("records/000000.jsonl", "manifest.json"):
        client.copy_object(Bucket=bucket, Key=f"{PREFIX}/{name}", CopySource={"Bucket": bucket, "Key": f"{other}/{name}"})
    code, _, err = await cli("snapshots", "get", f"s3://{bucket}/{PREFIX}", str(tmp_path / "d"), "--config", str(config))
    assert code == 1 and "belongs to i-test/evt-2" in err and files_under(tmp_path / "d") == []


async def test_version_1_is_read_and_reported_unauthenticated(moto_url: str, bucket: str, tmp_path: Path) -> None:
    key = crypto.Key(os.urandom(32))
    key_file = tmp_path / "key"
    key_file.write_bytes(key.raw)
    lines = (json.dumps(record("req-1")) + "\n").encode()
    stored = encrypt_v1(key, "records/000000.jsonl", lines)
    client = s3(moto_url)
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/records/000000.jsonl", Body=stored)
    doc = manifest([entry("records/000000.jsonl", "records", stored, encrypted=True)], version=1,
                   encryption={"algorithm": "AES-256-GCM", "key_id": key.key_id})
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/manifest.json", Body=json.dumps(doc).encode())
    config = write_config(tmp_path / "c.toml", endpoint_url=moto_url, encryption_key_file=str(key_file))
    url = f"s3://{bucket}/{PREFIX}"
    code, _, err = await cli("snapshots", "get", url, str(tmp_path / "d"), "--config", str(config))
    assert code == 1 and "format version 1" in err and "--allow-unauthenticated" in err
    code, out, err = await cli("snapshots", "get", url, str(tmp_path / "d"), "--config", str(config),
                               "--allow-unauthenticated")
    assert code == 0 and "format version 1" in err
    assert (tmp_path / "d" / "records" / "000000.jsonl").read_bytes() == lines


async def test_an_oversized_manifest_is_refused_unread(moto_url: str, bucket: str, tmp_path: Path) -> None:
    s3(moto_url).put_object(Bucket=bucket, Key=f"{PREFIX}/manifest.json", Body=b" " * (17 << 20))
    code, _, err = await cli("snapshots", "show", f"s3://{bucket}/{PREFIX}", "--config",
                             str(write_config(tmp_path / "c.toml", endpoint_url=moto_url)))
    assert code == 1 and "larger than" in err and "Traceback" not in err


async def test_resume_sends_nothing_but_to_to(moto_url: str, bucket: str, tmp_path: Path,
                                              fake_engine: FakeEngine) -> None:
    hits: list[str] = []

    async def trap(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "http":
            hits.append(scope["path"])
            await asgi.respond(send, 200, b"{}")

    async with anyio.create_task_group() as tg:
        bound = await tg.start(asgi.serve_tcp, trap, "127.0.0.1", 0)
        elsewhere = f"127.0.0.1:{bound.port}"
        records = [record("good"), record("at-sign", endpoint=f"@{elsewhere}/v1/chat/completions"),
                   record("scheme-relative", endpoint=f"//{elsewhere}/v1/chat/completions"),
                   record("absolute", endpoint=f"http://{elsewhere}/v1/chat/completions"),
                   record("dotdot", endpoint="/v1/chat/completions/../../admin"),
                   record("../../etc/passwd"), {"id": "no-fields"}]
        text = "\n".join(json.dumps(r) for r in records).encode() + b"\nnot json\n"
        client = s3(moto_url)
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/records/000000.jsonl", Body=text)
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/manifest.json",
                          Body=json.dumps(manifest([entry("records/000000.jsonl", "records", text)])).encode())
        config = write_config(tmp_path / "c.toml", endpoint_url=moto_url)
        out_file = tmp_path / "results.jsonl"
        code, out, err = await cli("resume", f"s3://{bucket}/{PREFIX}", "--to", fake_engine.url, "--config",
                                   str(config), "--jsonl", str(out_file))
        tg.cancel_scope.cancel()
    assert code == 1 and "Traceback" not in err
    assert hits == []  # nothing reached the other host
    assert [r.path for r in fake_engine.requests] == ["/v1/chat/completions"]  # only the good record
    results = [json.loads(line) for line in out_file.read_text().splitlines()]
    by_id = {r["id"]: r for r in results}
    assert len(results) == 8
    assert by_id["good"]["ok"] and by_id["good"]["text"]
    for name in ("at-sign", "scheme-relative", "absolute", "dotdot"):
        assert not by_id[name]["ok"] and "bad record" in by_id[name]["error"] and "endpoint" in by_id[name]["error"]
    assert not by_id["records/000000.jsonl:6"]["ok"] and "id" in by_id["records/000000.jsonl:6"]["error"]
    assert "not JSON" in by_id["records/000000.jsonl:8"]["error"]


async def test_a_poisoned_key_hides_no_other_snapshot_from_list(moto_url: str, bucket: str, tmp_path: Path) -> None:
    await real_snapshot(moto_url, bucket, event="evt-1")
    await real_snapshot(moto_url, bucket, event="evt-2")
    s3(moto_url).put_object(Bucket=bucket, Key="spotguard/i-test/evt-2/../../evil", Body=b"x")  # unparseable key
    code, out, err = await cli("snapshots", "list", "--url", f"s3://{bucket}/spotguard", "--config",
                               str(write_config(tmp_path / "c.toml", endpoint_url=moto_url)))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("complete") and "/i-test/evt-1 " in lines[0]
    assert "/i-test/evt-2 " in lines[1] and "UNREADABLE" in lines[1] and ".." in lines[1]
