"""How spotguard reaches the Kubernetes API server: in-cluster service account or a kubeconfig.

A kubeconfig is YAML (or JSON), read with PyYAML's safe loader. Supported auth: bearer ``token`` /
``tokenFile``, or none (``kubectl proxy``). Not supported: client certificates, ``exec`` plugins,
``auth-provider``, basic auth, ``proxy-url``: they raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from spotguard.errors import ConfigError

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
UNSUPPORTED_USER_KEYS = ("client-certificate", "client-certificate-data", "client-key", "client-key-data", "exec",
                         "auth-provider", "username", "password", "as")


@dataclass(frozen=True, kw_only=True)
class ApiAccess:
    """Where the API server is and how to authenticate; the token file is re-read on use (it rotates)."""

    server: str
    token: str = ""
    token_file: str = ""
    ca_file: str = ""
    ca_data: str = ""
    insecure: bool = False

    def bearer(self) -> str:
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read the Kubernetes token {self.token_file}: {exc}") from None
        return self.token

    def ssl_context(self) -> ssl.SSLContext | None:
        """None for plain http; otherwise a context trusting the cluster CA (or the system CAs)."""
        if not self.server.startswith("https://"):
            return None
        if self.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        try:
            return ssl.create_default_context(cafile=self.ca_file or None, cadata=self.ca_data or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the Kubernetes CA ({self.ca_file or 'certificate-authority-data'}): "
                              f"{exc}") from None


def resolve(api_url: str, kubeconfig: str, environ: Mapping[str, str] | None = None,
            service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> ApiAccess:
    """kubeconfig if set, else the in-cluster service account, else api_url alone (e.g. kubectl proxy)."""
    env = os.environ if environ is None else environ
    if kubeconfig:
        access = from_kubeconfig(Path(kubeconfig))
        return ApiAccess(**{**access.__dict__, "server": api_url or access.server})
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "443")
    token = service_account_dir / "token"
    if host and token.exists():
        host = f"[{host}]" if ":" in host else host
        ca = service_account_dir / "ca.crt"
        return ApiAccess(server=api_url or f"https://{host}:{port}", token_file=str(token),
                         ca_file=str(ca) if ca.exists() else "")
    if api_url:
        return ApiAccess(server=api_url)
    raise ConfigError("[kubernetes] enabled, but there is no in-cluster service account "
                      f"({service_account_dir}, KUBERNETES_SERVICE_HOST); set [kubernetes] kubeconfig or api_url")


def _named(items: Any, name: str, what: str, path: Path) -> dict[str, Any]:
    for item in items or []:
        if isinstance(item, dict) and item.get("name") == name and isinstance(item.get(what), dict):
            return dict(item[what])
    raise ConfigError(f"kubeconfig {path}: no {what} named {name!r}")


def from_kubeconfig(path: Path) -> ApiAccess:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"[kubernetes] kubeconfig {path} cannot be read: {exc}") from None
    data = parse(text, path)
    current = data.get("current-context")
    if not isinstance(current, str) or not current:
        raise ConfigError(f"kubeconfig {path}: no current-context")
    context = _named(data.get("contexts"), current, "context", path)
    cluster = _named(data.get("clusters"), str(context.get("cluster", "")), "cluster", path)
    user = _named(data.get("users"), str(context.get("user", "")), "user", path) if context.get("user") else {}
    for key in UNSUPPORTED_USER_KEYS:
        if user.get(key):
            raise ConfigError(f"kubeconfig {path}: user auth '{key}' is not supported; use a service-account "
                              f"token (token or tokenFile)")
    if cluster.get("proxy-url"):
        raise ConfigError(f"kubeconfig {path}: proxy-url is not supported")
    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise ConfigError(f"kubeconfig {path}: cluster {context.get('cluster')!r} has no server")
    ca_file = str(cluster.get("certificate-authority") or "")
    if ca_file and not os.path.isabs(ca_file):
        ca_file = str(path.parent / ca_file)
    ca_data = ""
    if cluster.get("certificate-authority-data"):
        try:
            ca_data = base64.b64decode(str(cluster["certificate-authority-data"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError(f"kubeconfig {path}: certificate-authority-data is not base64 PEM") from None
    token_file = str(user.get("tokenFile") or "")
    if token_file and not os.path.isabs(token_file):
        token_file = str(path.parent / token_file)
    return ApiAccess(server=server, token=str(user.get("token") or ""), token_file=token_file, ca_file=ca_file,
                     ca_data=ca_data, insecure=cluster.get("insecure-skip-tls-verify") is True)


def parse(text: str, path: Path) -> dict[str, Any]:
    """A kubeconfig as a dict (YAML, or JSON, which YAML reads too)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"kubeconfig {path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"kubeconfig {path}: not a mapping")
    return data
