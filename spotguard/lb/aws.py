"""AWS: leave ELBv2 target groups, and keep/complete the Auto Scaling lifecycle hook.

boto3 is an optional extra (``spotguard[aws]``) imported only when AWS is configured. Its clients
are built once at start-up (loading the service models takes tens of milliseconds we do not want to
spend inside a drain) and every call runs in a worker thread. botocore's own retries are off: the
retry policy and budget are ours (``spotguard.lb.retry``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from spotguard.errors import ConfigError, LoadBalancerError
from spotguard.lb.retry import CallDeadline, TransientError, count, with_retries

if TYPE_CHECKING:
    from spotguard.clouds.identity import Identity
    from spotguard.config import AwsConfig
    from spotguard.metrics import Metrics

PROVIDER = "aws"
NOTICE_WINDOW = 120.0
"""A spot interruption notice comes about two minutes before the instance goes."""
LIFECYCLE_CALL_BUDGET = 5.0
"""heartbeat() has no budget of its own in the protocol; one heartbeat may take this long."""
ASG_TAG = "aws:autoscaling:groupName"

_THROTTLED = frozenset({"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
                        "RequestThrottled", "SlowDown", "ServiceUnavailable", "InternalFailure",
                        "InternalError", "ServiceUnavailableException"})
_DENIED = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation",
                     "UnrecognizedClientException", "InvalidClientTokenId", "ExpiredToken",
                     "AuthFailure", "SignatureDoesNotMatch"})


def _import_boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise ConfigError("AWS load balancing is configured ([aws] target_group_arns or lifecycle_hook) but "
                          "boto3 is not installed: pip install 'spotguard[aws]'") from None
    return boto3


@dataclass(frozen=True)
class AwsClients:
    """boto3 clients (untyped third-party objects), built once; tests wrap them with botocore's Stubber."""

    elbv2: Any
    autoscaling: Any
    ec2: Any


def make_clients(region: str, endpoint_url: str) -> AwsClients:
    """Clients from the default credential chain (environment, profile, instance profile via IMDS)."""
    boto3 = _import_boto3()
    from botocore.config import Config as BotoConfig

    session = boto3.session.Session(region_name=region)
    options = BotoConfig(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=5,
                         max_pool_connections=16)
    endpoint = endpoint_url or None
    return AwsClients(elbv2=session.client("elbv2", endpoint_url=endpoint, config=options),
                      autoscaling=session.client("autoscaling", endpoint_url=endpoint, config=options),
                      ec2=session.client("ec2", endpoint_url=endpoint, config=options))


def _classify(exc: Exception, what: str, permission: str, resource: str, setting: str) -> LoadBalancerError:
    """Turn a botocore failure into our error tree (retryable or a message saying what to fix)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", ""))[:300]
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _THROTTLED or status == 429 or status >= 500:
            return TransientError(f"{what}: {code or status}: {message}")
        if code in _DENIED or status in (401, 403):
            return LoadBalancerError(f"{what}: {code}: {message}; grant {permission} on {resource} "
                                     f"to the instance role")
        if code.endswith("NotFound") or status == 404:
            return LoadBalancerError(f"{what}: {code}: {resource} not found ({message}); check {setting}")
        return LoadBalancerError(f"{what}: {code}: {message}")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return LoadBalancerError(f"{what}: no AWS credentials found; attach an instance profile whose role "
                                 f"allows {permission} (see docs/permissions.md)")
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)):
        return TransientError(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, BotoCoreError):
        return LoadBalancerError(f"{what}: {type(exc).__name__}: {exc}")
    raise exc


class AwsBalancer:
    """This instance in ELBv2 target groups and (optionally) an ASG lifecycle hook."""

    name = PROVIDER

    def __init__(self, config: AwsConfig, identity: Identity, *, metrics: Metrics | None = None,
                 clients: AwsClients | None = None) -> None:
        region = config.region or identity.region
        if not region:
            raise ConfigError("[aws] region is empty and the instance metadata gave none; set [aws] region")
        if not identity.instance_id:
            raise ConfigError("AWS deregistration needs this instance's id; the metadata gave none "
                              "(set [agent] instance_id)")
        self._config = config
        self._instance_id = identity.instance_id
        self._metrics = metrics
        self.clients = clients if clients is not None else make_clients(region, config.endpoint_url)
        self._asg_name = config.autoscaling_group
        """Filled from the instance's tag on first use when not configured."""

    def _target(self) -> dict[str, Any]:
        port = self._config.target_port
        return {"Id": self._instance_id, "Port": port} if port else {"Id": self._instance_id}

    async def _call(self, func: Callable[..., Any], *, what: str, permission: str, resource: str,
                    setting: str, **kwargs: Any) -> dict[str, Any]:
        """One boto3 call in a worker thread; abandoned (not waited for) if our deadline passes first."""
        try:
            result = await anyio.to_thread.run_sync(functools.partial(func, **kwargs), abandon_on_cancel=True)
        except Exception as exc:
            raise _classify(exc, what, permission, resource, setting) from exc
        return dict(result)

    async def deregister(self, *, budget: float, dry_run: bool) -> str:
        return await self._targets("DeregisterTargets", budget=budget, dry_run=dry_run)

    async def register(self, *, budget: float, dry_run: bool) -> str:
        """RegisterTargets with the very target deregister used (same port), so the pool is as it was."""
        return await self._targets("RegisterTargets", budget=budget, dry_run=dry_run)

    async def _targets(self, action: str, *, budget: float, dry_run: bool) -> str:
        arns = self._config.target_group_arns
        target = self._target()
        shown = f"{target['Id']}:{target['Port']}" if "Port" in target else str(target["Id"])
        if not arns:
            return "no target groups configured"
        if dry_run:
            count(self._metrics, PROVIDER, "dry_run")
            return f"dry run: would call elasticloadbalancing:{action} for {shown} on {', '.join(arns)}"
        # Both calls are idempotent: registering a member or deregistering a stranger succeeds.
        func = self.clients.elbv2.register_targets if action == "RegisterTargets" else \
            self.clients.elbv2.deregister_targets
        errors: list[str] = []

        async def one(arn: str) -> None:
            async def call() -> dict[str, Any]:
                return await self._call(func, TargetGroupArn=arn, Targets=[target], what=f"{action} {arn}",
                                        permission=f"elasticloadbalancing:{action}", resource=arn,
                                        setting="[aws] target_group_arns")
            try:
                await with_retries(call, what=f"{action} {arn}", budget=budget, provider=PROVIDER,
                                   metrics=self._metrics)
            except LoadBalancerError as exc:
                errors.append(str(exc))

        # Target groups are independent; calling them at once keeps the drain short.
        async with anyio.create_task_group() as tg:
            for arn in arns:
                tg.start_soon(one, arn, name=f"lb.aws.{action} {arn}")
        if errors:
            raise LoadBalancerError("; ".join(errors))
        verb = "registered" if action == "RegisterTargets" else "deregistered"
        where = "in" if action == "RegisterTargets" else "from"
        return f"{verb} {shown} {where} {len(arns)} target group(s)"

    async def check(self, *, budget: float) -> tuple[str, ...]:
        """Warnings for start-up and doctor: a deregistration delay longer than the notice window."""
        warnings: list[str] = []
        deadline = CallDeadline.after(budget)
        for arn in self._config.target_group_arns:
            async def call(arn: str = arn) -> dict[str, Any]:
                return await self._call(self.clients.elbv2.describe_target_group_attributes, TargetGroupArn=arn,
                                        what=f"DescribeTargetGroupAttributes {arn}",
                                        permission="elasticloadbalancing:DescribeTargetGroupAttributes",
                                        resource=arn, setting="[aws] target_group_arns")
            try:
                answer = await with_retries(call, what=f"DescribeTargetGroupAttributes {arn}",
                                            budget=deadline.left(), provider=PROVIDER, metrics=self._metrics)
            except LoadBalancerError as exc:
                warnings.append(f"cannot read the attributes of {arn}: {exc}")
                continue
            attributes = {a.get("Key"): a.get("Value") for a in answer.get("Attributes", [])}
            raw = attributes.get("deregistration_delay.timeout_seconds")
            try:
                delay = float(raw) if raw is not None else 300.0  # the documented default
            except ValueError:
                warnings.append(f"{arn}: unreadable deregistration_delay.timeout_seconds {raw!r}")
                continue
            if delay > NOTICE_WINDOW:
                warnings.append(f"{arn}: deregistration_delay.timeout_seconds is {delay:.0f}s, longer than the "
                                f"{NOTICE_WINDOW:.0f}s spot notice; the target keeps draining after the instance "
                                f"is gone. Lower it (e.g. 30-90 s) with ModifyTargetGroupAttributes")
        return tuple(warnings)

    async def _group_name(self, budget: float) -> str:
        if self._asg_name:
            return self._asg_name

        async def call() -> dict[str, Any]:
            return await self._call(
                self.clients.ec2.describe_tags,
                Filters=[{"Name": "resource-id", "Values": [self._instance_id]},
                         {"Name": "key", "Values": [ASG_TAG]}],
                what="DescribeTags", permission="ec2:DescribeTags", resource=self._instance_id,
                setting="[aws] autoscaling_group")
        answer = await with_retries(call, what="DescribeTags", budget=budget, provider=PROVIDER,
                                    metrics=self._metrics)
        values = [str(tag.get("Value", "")) for tag in answer.get("Tags", []) if tag.get("Key") == ASG_TAG]
        if not values or not values[0]:
            raise LoadBalancerError(f"instance {self._instance_id} has no {ASG_TAG} tag; set [aws] autoscaling_group")
        self._asg_name = values[0]
        return self._asg_name

    async def _lifecycle(self, action: str, budget: float, **extra: Any) -> None:
        deadline = CallDeadline.after(budget)
        group = await self._group_name(deadline.left())
        from botocore import xform_name  # CompleteLifecycleAction -> complete_lifecycle_action

        func = getattr(self.clients.autoscaling, xform_name(action))

        async def call() -> dict[str, Any]:
            return await self._call(func, LifecycleHookName=self._config.lifecycle_hook, AutoScalingGroupName=group,
                                    InstanceId=self._instance_id, **extra, what=action,
                                    permission=f"autoscaling:{action}",
                                    resource=f"autoScalingGroup {group}", setting="[aws] lifecycle_hook")
        await with_retries(call, what=action, budget=deadline.left(), provider=PROVIDER, metrics=self._metrics)

    async def heartbeat(self, *, dry_run: bool) -> None:
        if not self._config.lifecycle_hook:
            return
        if dry_run:
            count(self._metrics, PROVIDER, "dry_run")
            return
        await self._lifecycle("RecordLifecycleActionHeartbeat", LIFECYCLE_CALL_BUDGET)

    async def complete(self, *, budget: float, dry_run: bool) -> str:
        hook = self._config.lifecycle_hook
        if not hook:
            return "no lifecycle hook configured"
        if dry_run:
            count(self._metrics, PROVIDER, "dry_run")
            return f"dry run: would call autoscaling:CompleteLifecycleAction CONTINUE for {self._instance_id} ({hook})"
        await self._lifecycle("CompleteLifecycleAction", budget, LifecycleActionResult="CONTINUE")
        return f"completed lifecycle action {hook} (CONTINUE) for {self._instance_id}"
