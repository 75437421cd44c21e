"""examples/: every commented config loads through the real loader and passes doctor's static checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spotguard.config import load
from spotguard.doctor import budget_check
from spotguard.preflight import gate_port_check, stop_timeout_check

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CLOUDS = {"aws.toml": "aws", "gcp.toml": "gcp", "azure.toml": "azure", "bare-vm.toml": "none"}


def test_there_is_one_example_per_cloud_and_the_readme_links_each() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.toml")) == sorted(CLOUDS)
    readme = (REPO / "README.md").read_text()
    for name in CLOUDS:
        assert f"(examples/{name})" in readme, name
    for mentioned in re.findall(r"examples/[\w.-]+", readme):  # nothing the README names is missing
        assert (REPO / mentioned).exists(), mentioned


@pytest.mark.parametrize("name", sorted(CLOUDS))
def test_each_example_loads_and_fits_its_window(name: str, tmp_path: Path) -> None:
    path = EXAMPLES / name
    config = load(path, environ={})
    assert config.agent.cloud == CLOUDS[name]
    text = path.read_text()
    assert text.startswith("#") and text.count("\n#") >= 5  # commented, not a bare list of keys
    assert budget_check(config, CLOUDS[name]).level == "ok", budget_check(config, CLOUDS[name]).detail
    gate = gate_port_check(config)
    assert gate is not None and gate.level == "ok", gate
    (tmp_path / "spotguard.service").write_text((REPO / "systemd" / "spotguard.service").read_text())
    assert stop_timeout_check(config, (tmp_path,)).level == "ok"


def test_cloud_examples_name_their_load_balancer() -> None:
    aws = load(EXAMPLES / "aws.toml", environ={})
    assert aws.aws.target_group_arns and aws.aws.lifecycle_hook and aws.aws.target_port == 8080
    gcp = load(EXAMPLES / "gcp.toml", environ={})
    assert gcp.gcp.network_endpoint_groups and gcp.gcp.neg_port == 8080
    azure = load(EXAMPLES / "azure.toml", environ={})
    assert azure.azure.backend_pools
