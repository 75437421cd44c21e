"""Kubernetes: cordon/taint/label through a loopback API server; in-cluster and kubeconfig auth."""

from __future__ import annotations

import base64
import datetime
import re
from pathlib import Path

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from spotguard.config import KubernetesConfig
from spotguard.errors import ConfigError, LoadBalancerError
from spotguard.lb.kubeconfig import from_kubeconfig
from spotguard.lb.kubernetes import DRAINED_ANNOTATION, EXCLUDE_LABEL, KubernetesNode
from spotguard.metrics import Metrics
from tests.lb.fakes import FakeKubernetes, node, served

SA_TOKEN = "eyJhbGciOiJSUzI1NiJ9.sa-token"


def _fake() -> FakeKubernetes:
    return FakeKubernetes(token=re.compile(re.escape(f"Bearer {SA_TOKEN}")), nodes={"gpu-node-1": node("gpu-node-1")})


def _in_cluster(tmp_path: Path, url: str, http: httpx.AsyncClient, name: str = "gpu-node-1",
                metrics: Metrics | None = None) -> KubernetesNode:
    sa = tmp_path / "serviceaccount"
    sa.mkdir(exist_ok=True)
    (sa / "token").write_text(SA_TOKEN + "\n")
    config = KubernetesConfig(enabled=True, node_name=name, api_url=url)
    return KubernetesNode(config, http, metrics=metrics, environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1"},
                          service_account_dir=sa)


@pytest.mark.anyio
async def test_cordons_taints_and_labels_keeping_existing_taints(tmp_path: Path) -> None:
    fake = _fake()
    async with served(fake) as url, httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            await _in_cluster(tmp_path, url, http, metrics=Metrics()).deregister(budget=5, dry_run=False)
    patched = fake.nodes["gpu-node-1"]
    assert patched["spec"]["unschedulable"] is True
    assert patched["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
                                         {"key": "spotguard.io/draining", "value": "true", "effect": "NoSchedule"}]
    assert patched["metadata"]["labels"] == {"kubernetes.io/hostname": "gpu-node-1", EXCLUDE_LABEL: "true"}
    patch = fake.calls("PATCH")[0]
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body["metadata"]["resourceVersion"] == "100"


@pytest.mark.anyio
async def test_a_concurrent_change_409_is_re_read_and_not_clobbered(tmp_path: Path) -> None:
    fake = _fake()
    fake.race_once = True
    async with served(fake) as url, httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            await _in_cluster(tmp_path, url, http).deregister(budget=5, dry_run=False)
    keys = [t["key"] for t in fake.nodes["gpu-node-1"]["spec"]["taints"]]
    assert keys == ["nvidia.com/gpu", "node.kubernetes.io/unreachable", "spotguard.io/draining"]
    assert [s.method for s in fake.seen] == ["GET", "PATCH", "GET", "PATCH"]


@pytest.mark.anyio
async def test_a_second_drain_does_not_add_the_taint_twice(tmp_path: Path) -> None:
    fake = _fake()
    async with served(fake) as url, httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            await _in_cluster(tmp_path, url, http).deregister(budget=5, dry_run=False)
            await _in_cluster(tmp_path, url, http).deregister(budget=5, dry_run=False)
    assert len(fake.nodes["gpu-node-1"]["spec"]["taints"]) == 2


def _without_version(node_: dict[str, object]) -> dict[str, object]:
    copy = dict(node_)
    # The API server drops an emptied map (omitempty); the RFC 7386 fake keeps it as {}.
    copy["metadata"] = {k: v for k, v in node_["metadata"].items()  # type: ignore[attr-defined]
                        if k != "resourceVersion" and v != {}}
    return copy


@pytest.mark.anyio
async def test_register_after_a_restart_puts_the_node_back_as_it_was(tmp_path: Path) -> None:
    fake = _fake()
    async with served(fake) as url, httpx.AsyncClient() as http:
        with anyio.fail_after(20):
            await _in_cluster(tmp_path, url, http).deregister(budget=5, dry_run=False)
            assert fake.nodes["gpu-node-1"]["metadata"]["annotations"] == {DRAINED_ANNOTATION: "cordon,exclude-label"}
            # A new daemon (nothing in memory) reads what spotguard changed from the node itself.
            detail = await _in_cluster(tmp_path, url, http).register(budget=5, dry_run=False)
            again = await _in_cluster(tmp_path, url, http).register(budget=5, dry_run=False)
    assert _without_version(fake.nodes["gpu-node-1"]) == _without_version(node("gpu-node-1"))
    assert detail == ("node gpu-node-1: removed taint spotguard.io/draining; uncordoned; removed the exclude label")
    assert again.endswith("left as is")
    assert [s.method for s in fake.seen] == ["GET", "PATCH", "GET", "PATCH", "GET"]
    assert fake.calls("PATCH")[1].body["metadata"]["resourceVersion"] == "101"


@pytest.mark.anyio
async def test_register_leaves_an_operators_cordon_and_label(tmp_path: Path) -> None:
    fake = _fake()
    mine = fake.nodes["gpu-node-1"]
    mine["spec"]["unschedulable"] = True
    mine["metadata"]["labels"][EXCLUDE_LABEL] = "true"
    async with served(fake) as url, httpx.AsyncClient() as http:
        with anyio.fail_after(20):
            await _in_cluster(tmp_path, url, http).deregister(budget=5, dry_run=False)
            await _in_cluster(tmp_path, url, http).deregister(budget=5, dry_run=False)  # a second drain
            detail = await _in_cluster(tmp_path, url, http).register(budget=5, dry_run=False)
    after = fake.nodes["gpu-node-1"]
    assert after["spec"]["unschedulable"] is True
    assert after["metadata"]["labels"][EXCLUDE_LABEL] == "true"
    assert after["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    assert not after["metadata"].get("annotations")
    assert "kept cordon (not spotguard's)" in detail


@pytest.mark.anyio
async def test_register_dry_run_and_refusal(tmp_path: Path) -> None:
    fake = _fake()
    async with served(fake) as url, httpx.AsyncClient() as http:
        with anyio.fail_after(20):
            detail = await _in_cluster(tmp_path, url, http).register(budget=5, dry_run=True)
            assert "would PATCH" in detail and fake.seen == []
            await _in_cluster(tmp_path, url, http).deregister(budget=5, dry_run=False)
            fake.forbidden.add("gpu-node-1")
            with pytest.raises(LoadBalancerError, match="get and patch on nodes"):
                await _in_cluster(tmp_path, url, http).register(budget=5, dry_run=False)


@pytest.mark.anyio
async def test_503_is_retried(tmp_path: Path) -> None:
    fake = _fake()
    fake.fail_next(503, times=2)
    async with served(fake) as url, httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            await _in_cluster(tmp_path, url, http).deregister(budget=5, dry_run=False)
    assert fake.nodes["gpu-node-1"]["spec"]["unschedulable"] is True


@pytest.mark.anyio
async def test_403_names_the_rbac_rule(tmp_path: Path) -> None:
    fake = _fake()
    fake.forbidden.add("gpu-node-1")
    async with served(fake) as url, httpx.AsyncClient() as http:
        with anyio.fail_after(10), pytest.raises(LoadBalancerError, match="get and patch on nodes"):
            await _in_cluster(tmp_path, url, http).deregister(budget=5, dry_run=False)


@pytest.mark.anyio
async def test_unknown_node_names_the_setting(tmp_path: Path) -> None:
    fake = _fake()
    async with served(fake) as url, httpx.AsyncClient() as http:
        with anyio.fail_after(10), pytest.raises(LoadBalancerError, match=r"\[kubernetes\] node_name"):
            await _in_cluster(tmp_path, url, http, name="nope").deregister(budget=5, dry_run=False)


@pytest.mark.anyio
async def test_dry_run_calls_nothing(tmp_path: Path) -> None:
    fake = _fake()
    async with served(fake) as url, httpx.AsyncClient() as http:
        detail = await _in_cluster(tmp_path, url, http).deregister(budget=5, dry_run=True)
    assert "would PATCH" in detail and fake.seen == []


KUBECONFIG = """\
apiVersion: v1
clusters:
- cluster:
    server: {server}
  name: gpu
contexts:
- context:
    cluster: gpu
    user: spotguard
  name: gpu
current-context: gpu
kind: Config
preferences: {{}}
users:
- name: spotguard
  user:
    token: "{token}"
"""


@pytest.mark.anyio
async def test_kubeconfig_with_a_token(tmp_path: Path) -> None:
    fake = _fake()
    async with served(fake) as url, httpx.AsyncClient() as http:
        path = tmp_path / "config"
        path.write_text(KUBECONFIG.format(server=url, token=SA_TOKEN))
        balancer = KubernetesNode(KubernetesConfig(enabled=True, node_name="gpu-node-1", kubeconfig=str(path)),
                                  http, environ={})
        with anyio.fail_after(10):
            await balancer.deregister(budget=5, dry_run=False)
    assert fake.nodes["gpu-node-1"]["spec"]["unschedulable"] is True


def _ca_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_kubeconfig_ca_data_builds_a_tls_context(tmp_path: Path) -> None:
    path = tmp_path / "config"
    text = KUBECONFIG.format(server="https://10.0.0.1:6443", token=SA_TOKEN).replace(
        "    server:", f"    certificate-authority-data: {base64.b64encode(_ca_pem()).decode()}\n    server:")
    path.write_text(text)
    access = from_kubeconfig(path)
    context = access.ssl_context()
    assert context is not None and context.get_ca_certs()[0]["subject"] == ((("commonName", "kubernetes"),),)
    assert access.bearer() == SA_TOKEN


@pytest.mark.parametrize("user", ["    exec:\n      command: aws", "    client-certificate-data: AAAA"])
def test_unsupported_kubeconfig_auth_is_named(tmp_path: Path, user: str) -> None:
    path = tmp_path / "config"
    path.write_text(KUBECONFIG.format(server="https://x", token="t").replace('    token: "t"', user))
    with pytest.raises(ConfigError, match=user.split(":")[0].strip()):
        from_kubeconfig(path)


def test_no_way_to_reach_the_api_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[kubernetes\] kubeconfig or api_url"):
        KubernetesNode(KubernetesConfig(enabled=True), httpx.AsyncClient(), environ={},
                       service_account_dir=tmp_path)


def test_kubeconfig_yaml_beyond_what_kubectl_writes(tmp_path: Path) -> None:
    """Hand-edited kubeconfigs use flow mappings, anchors and comments: a real YAML parser reads them all."""
    path = tmp_path / "config"
    path.write_text("""\
# edited by hand
clusters: [{name: gpu, cluster: {server: "https://10.0.0.1:6443", insecure-skip-tls-verify: true}}]
users:
- name: spotguard
  user: &sa {token: abc123}   # the service account's token
contexts:
- {name: gpu, context: {cluster: gpu, user: spotguard}}
current-context: gpu
""")
    access = from_kubeconfig(path)
    assert access.server == "https://10.0.0.1:6443" and access.insecure and access.bearer() == "abc123"
    path.write_text("clusters: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        from_kubeconfig(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="not a mapping"):
        from_kubeconfig(path)
