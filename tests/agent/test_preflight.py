"""doctor's checks of what breaks evictions in practice: stop timeout, gate placement, peers, target groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import boto3
import httpx
import pytest

from spotguard.clouds.identity import Identity
from spotguard.config import Config, load
from spotguard.preflight import (
    balancer_checks,
    gate_port_check,
    parse_timespan,
    peers_check,
    resume_check,
    stop_timeout_check,
)

REPO = Path(__file__).resolve().parents[2]
GATED = {"gate": {"listen": "0.0.0.0:8080", "upstream": "http://127.0.0.1:8000"},
         "server": {"kind": "vllm", "unit": "vllm.service", "url": "http://127.0.0.1:8000"}}


def config(**sections: dict[str, Any]) -> Config:
    return load(None, environ={}, overrides=sections)


def test_systemd_time_spans() -> None:
    assert parse_timespan("40") == 40
    assert parse_timespan("40s") == 40
    assert parse_timespan("1min 30s") == 90
    assert parse_timespan("1min30s") == 90
    assert parse_timespan("500ms") == 0.5
    assert parse_timespan("2h") == 7200
    assert parse_timespan("infinity") is None
    for bad in ("", "forty", "10 parsecs", "1min -3s"):
        with pytest.raises(ValueError):
            parse_timespan(bad)


def test_stop_timeout_against_the_shutdown_budget(tmp_path: Path) -> None:
    assert stop_timeout_check(config(), (tmp_path,)).level == "warning"  # no unit installed
    (tmp_path / "spotguard.service").write_text((REPO / "systemd" / "spotguard.service").read_text())
    shipped = stop_timeout_check(config(), (tmp_path,))
    assert shipped.level == "ok" and "TimeoutStopSec=40" in shipped.detail  # the shipped unit fits the default
    assert stop_timeout_check(config(shutdown={"budget": 40.0}), (tmp_path,)).level == "error"
    assert stop_timeout_check(config(shutdown={"budget": 37.0}), (tmp_path,)).level == "warning"
    dropins = tmp_path / "spotguard.service.d"
    dropins.mkdir()
    (dropins / "50-short.conf").write_text("[Service]\nTimeoutStopSec=20s\n")
    short = stop_timeout_check(config(), (tmp_path,))
    assert short.level == "error" and "50-short.conf" in short.detail and "at least 30s" in short.detail
    # A later drop-in wins; a [Unit] line of the same name does not count; TimeoutSec= sets the stop timeout too.
    (dropins / "60-long.conf").write_text("[Unit]\nTimeoutStopSec=1s\n[Service]\nTimeoutSec=1min 30s\n")
    assert stop_timeout_check(config(), (tmp_path,)).level == "ok"
    (dropins / "70-reset.conf").write_text("[Service]\nTimeoutStopSec=\n")
    assert "default 90s" in stop_timeout_check(config(), (tmp_path,)).detail
    (dropins / "80-bad.conf").write_text("[Service]\nTimeoutStopSec=soon\n")
    assert stop_timeout_check(config(), (tmp_path,)).level == "error"
    assert stop_timeout_check(config(shutdown={"enabled": False}), (tmp_path / "none",)).level == "warning"


def test_the_load_balancer_must_target_the_gate_not_the_engine() -> None:
    assert gate_port_check(config()) is None  # gate off: nothing to check
    arn = "arn:aws:elasticloadbalancing:us-east-1:111122223333:targetgroup/llm/0123456789abcdef"
    past = gate_port_check(config(**GATED, aws={"target_group_arns": [arn], "target_port": 8000}))
    assert past is not None and past.level == "error" and "past the gate" in past.detail
    good = gate_port_check(config(**GATED, aws={"target_group_arns": [arn], "target_port": 8080}))
    assert good is not None and good.level == "ok"
    unknown = gate_port_check(config(**GATED, aws={"target_group_arns": [arn]}))
    assert unknown is not None and unknown.level == "warning" and "[aws] target_port = 0" in unknown.detail
    neg = gate_port_check(config(**GATED, gcp={"network_endpoint_groups": ["zones/z/networkEndpointGroups/n"],
                                               "neg_port": 8000}))
    assert neg is not None and neg.level == "error" and "[gcp] neg_port" in neg.detail
    elsewhere = gate_port_check(config(**GATED, gcp={"network_endpoint_groups": ["zones/z/networkEndpointGroups/n"],
                                                     "neg_port": 9000}))
    assert elsewhere is not None and elsewhere.level == "warning"
    other_engine = gate_port_check(config(gate=GATED["gate"], server={"kind": "vllm", "unit": "vllm.service",
                                                                      "url": "http://127.0.0.1:9999"}))
    assert other_engine is not None and other_engine.level == "warning" and "not in front" in other_engine.detail
    no_upstream = gate_port_check(config(gate={"listen": "0.0.0.0:8080"}))
    assert no_upstream is not None and no_upstream.level == "error"


def test_peers_are_checked_where_the_gate_is_on() -> None:
    lonely = peers_check(config(**GATED))
    assert lonely is not None and lonely.level == "warning" and "peers is empty" in lonely.detail
    paired = peers_check(config(gate={**GATED["gate"], "peers": ["https://10.0.0.2:8080", "http://127.0.0.1:8081",
                                                                 "http://localhost:8082", "http://[::1]:8083"]}))
    assert paired is not None and paired.level == "ok"
    clear = peers_check(config(gate={**GATED["gate"], "peers": ["https://10.0.0.2:8080", "http://10.0.0.3:8080",
                                                                "http://llm-internal.example"]}))
    assert clear is not None and clear.level == "warning"
    assert "http://10.0.0.3:8080, http://llm-internal.example: plain http" in clear.detail
    assert "https://10.0.0.2" not in clear.detail
    assert peers_check(config()) is None  # no gate: nothing to move requests with


@pytest.mark.anyio
async def test_target_group_deregistration_delay_longer_than_the_notice(moto_reset: str) -> None:
    ec2 = boto3.client("ec2", endpoint_url=moto_reset, region_name="us-east-1")
    elbv2 = boto3.client("elbv2", endpoint_url=moto_reset, region_name="us-east-1")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    arn = elbv2.create_target_group(Name="llm", Protocol="HTTP", Port=8080, VpcId=vpc,
                                    TargetType="instance")["TargetGroups"][0]["TargetGroupArn"]
    cfg = config(aws={"endpoint_url": moto_reset, "region": "us-east-1", "target_group_arns": [arn],
                      "target_port": 8080})
    identity = Identity(cloud="aws", instance_id="i-0123456789abcdef0")
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(30):
            (slow,) = await balancer_checks(cfg, http, identity)
        assert slow.level == "warning" and "300s" in slow.detail and "longer than the 120s" in slow.detail
        elbv2.modify_target_group_attributes(
            TargetGroupArn=arn, Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": "60"}])
        with anyio.fail_after(30):
            (fits,) = await balancer_checks(cfg, http, identity)
        assert fits.level == "ok"
        (broken,) = await balancer_checks(config(aws={"target_group_arns": [arn]}), http,
                                          Identity(cloud="aws", instance_id="i-1"))
        assert broken.level == "error" and "[aws] region" in broken.detail


def test_doctor_reports_the_new_checks(tmp_path: Path) -> None:
    """`spotguard doctor --json` on the bare-VM example: the checks above appear among the others."""
    env = {**os.environ, "SPOTGUARD_AGENT_STATE_DIR": str(tmp_path / "state"),
           "SPOTGUARD_CONTROL_SOCKET": str(tmp_path / "control.sock")}
    done = subprocess.run([str(Path(sys.executable).with_name("spotguard")), "doctor", "--json", "--config",
                           str(REPO / "examples" / "bare-vm.toml")], capture_output=True, text=True, timeout=60,
                          env=env, check=False)
    checks = {c["name"]: c for c in json.loads(done.stdout)}
    assert {"drain budget", "unit ordering", "stop timeout", "gate in front"} <= set(checks), done.stdout
    assert checks["drain budget"]["level"] == "ok" and checks["gate in front"]["level"] == "ok"
    assert checks["gate peers"]["level"] == "warning"  # the bare VM has no other replica to hand work to


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "127.0.0.2:8080", "[::1]:8080", "localhost:8080"])
def test_answers_held_on_a_loopback_address_are_said_to_be_out_of_other_gates_reach(tmp_path: Path,
                                                                                    listen: str) -> None:
    key = tmp_path / "resume.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    check = resume_check(config(gate={**GATED["gate"], "listen": listen}, server=GATED["server"],
                                resume={"key_file": str(key), "index": False}))
    assert check is not None and check.level == "warning" and "other gates cannot reach" in check.detail
