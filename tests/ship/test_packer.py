"""The Packer templates parse (python-hcl2: syntax only; Debian's packer 1.6.6 cannot read required_plugins),
every source is built, every variable and local referenced is declared, and the provisioners call the
install script with options it knows."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import hcl2
import pytest

from tests.ship.conftest import INSTALL_SCRIPT, REPO

PACKER = REPO / "packer"
REFERENCE = re.compile(r"\b(var|local|source)\.([A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)?)")


def unquote(text: str) -> str:
    # python-hcl2 8.x keeps the quotes of string literals and block labels.
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


def load(name: str) -> dict[str, Any]:
    with open(PACKER / name) as handle:
        return dict(hcl2.load(handle))


def strings(node: Any) -> Iterator[str]:
    """Every string value and key in a parsed template, comments left out."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "__comments__":
                continue
            yield key
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load("spotguard.pkr.hcl")


@pytest.fixture(scope="module")
def variables() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(PACKER.glob("*.pkr.hcl")):
        for block in load(path.name).get("variable", []):
            for name, body in block.items():
                assert unquote(name) not in found, f"variable {name} declared twice"
                found[unquote(name)] = body
    return found


def declared_sources(template: dict[str, Any]) -> set[str]:
    return {f"{unquote(kind)}.{unquote(name)}" for block in template["source"] for kind, named in block.items()
            for name in named if name != "__is_block__"}


def test_required_plugins_cover_the_three_clouds(template: dict[str, Any]) -> None:
    plugins = template["packer"][0]["required_plugins"][0]
    assert {unquote(k) for k in plugins if not k.startswith("__")} == {"amazon", "googlecompute", "azure"}
    for name, spec in plugins.items():
        if not name.startswith("__"):
            assert unquote(spec["source"]).startswith("github.com/hashicorp/"), name


def test_every_source_is_built(template: dict[str, Any]) -> None:
    sources = declared_sources(template)
    assert {s.split(".")[0] for s in sources} == {"amazon-ebs", "googlecompute", "azure-arm"}
    built = {unquote(s).removeprefix("source.") for build in template["build"] for s in build["sources"]}
    assert built == sources
    for build in template["build"]:
        for provisioner in build.get("provisioner", []):
            for body in provisioner.values():
                for only in body.get("only", []):
                    assert unquote(only) in sources, only


def test_every_reference_is_declared_and_every_variable_used(template: dict[str, Any],
                                                             variables: dict[str, dict[str, Any]]) -> None:
    refs = {(kind, name) for text in strings(template) for kind, name in REFERENCE.findall(text)}
    refs |= {(kind, name) for body in variables.values() for text in strings(body)
             for kind, name in REFERENCE.findall(text)}
    locals_ = {unquote(k) for block in template.get("locals", []) for k in block if not k.startswith("__")}
    used_vars = {name for kind, name in refs if kind == "var"}
    assert used_vars - set(variables) == set(), "referenced but not declared"
    assert set(variables) - used_vars == set(), "declared but never used"
    assert {name for kind, name in refs if kind == "local"} <= locals_
    assert {name for kind, name in refs if kind == "source"} <= declared_sources(template)
    for name, body in variables.items():
        assert "type" in body, f"variable {name} has no type"


def test_provisioners_upload_and_run_the_install_script(template: dict[str, Any]) -> None:
    provisioners = [(unquote(kind), body) for build in template["build"] for p in build["provisioner"]
                    for kind, body in p.items()]
    kinds = [kind for kind, _ in provisioners]
    assert "file" in kinds and kinds.index("file") < max(i for i, k in enumerate(kinds) if k == "shell")
    text = "\n".join(strings(template))
    assert "scripts/install-spotguard.sh" in text and "/../systemd" in text
    run = [line for _, body in provisioners for line in body.get("inline", []) if "install-spotguard.sh" in line]
    assert len(run) == 1
    locals_text = "\n".join(strings(template["locals"]))
    script = INSTALL_SCRIPT.read_text()
    # Options after --pip-arg belong to pip, not to the script.
    for option in set(re.findall(r"(?<!--pip-arg )--[a-z][a-z-]+", locals_text)):
        assert f"{option})" in script or f"{option} |" in script, f"install script lacks {option}"


def test_inference_unit_default_is_a_unit_name(variables: dict[str, dict[str, Any]]) -> None:
    assert re.fullmatch(r"[A-Za-z0-9:_.@-]+\.service", unquote(variables["inference_unit"]["default"]))
