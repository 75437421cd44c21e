"""Builds the configured load-balancer providers once, at daemon start-up."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from spotguard.clouds.identity import Identity
    from spotguard.config import Config
    from spotguard.lb.base import LoadBalancer
    from spotguard.metrics import Metrics


def build_balancers(config: Config, http: httpx.AsyncClient, identity: Identity, *,
                    metrics: Metrics | None = None) -> tuple[LoadBalancer, ...]:
    """One provider per configured section; raises ConfigError for a setting that cannot work.

    Providers are chosen by their settings, not by the detected cloud: a Kubernetes node on AWS can
    leave target groups and be cordoned in the same drain.
    """
    balancers: list[LoadBalancer] = []
    if config.aws.target_group_arns or config.aws.lifecycle_hook:
        from spotguard.lb.aws import AwsBalancer  # boto3 is an optional extra: import only when needed

        balancers.append(AwsBalancer(config.aws, identity, metrics=metrics))
    if config.gcp.instance_groups or config.gcp.network_endpoint_groups:
        from spotguard.lb.gcp import GcpBalancer

        balancers.append(GcpBalancer(config.gcp, http, identity, metrics=metrics))
    if config.azure.backend_pools:
        from spotguard.lb.azure import AzureBalancer

        balancers.append(AzureBalancer(config.azure, http, identity, metrics=metrics))
    if config.kubernetes.enabled:
        from spotguard.lb.kubernetes import KubernetesNode

        balancers.append(KubernetesNode(config.kubernetes, http, metrics=metrics))
    return tuple(balancers)
