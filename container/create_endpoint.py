"""Create (or update) the SageMaker *asynchronous* endpoint that runs this image, with
autoscaling on its backlog down to zero instances.

    sd-create-endpoint --name sd-prod --image <ECR URI> --role <execution role ARN> \\
        --model-store s3://bucket/models/ --output s3://bucket/outputs/

Calls, in order: ``create_model`` → ``create_endpoint_config`` (async: S3 output and
failure paths, optional SNS topics, N invocations per instance) → ``create_endpoint``
(``update_endpoint`` with ``--update``) → poll until ``InService`` → Application Auto
Scaling: the variant as a scalable target (min..max), a target-tracking policy on
``ApproximateBacklogSizePerInstance`` and, when the minimum is 0, a step policy fired by
a CloudWatch alarm on ``HasBacklogWithoutCapacity``: target tracking alone never scales
out from zero, since with no instance there is no per-instance backlog to track.

Exit codes (sdctl's, ``client/config.py``): 0 done; 2 bad input, found before any AWS
call; 3 endpoint state: exists (without ``--update``), missing (``--scaling-only``), busy,
``Failed``, or not ``InService`` within ``--timeout``; 5 AWS: no credentials or region,
or a call refused (permissions, validation).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from client.cli_common import handled
from client.config import EXIT_AWS, EXIT_ENDPOINT, CliError
from container.endpoint_spec import (
    DIMENSION,
    Options,
    backlog_policy_request,
    config_request,
    model_request,
    plan,
    policy_names,
    scaling_ids,
    target_request,
    validate,
    zero_alarm_request,
    zero_policy_request,
)

POLL_SECONDS = 15.0


# ------------------------------------------------------------------ AWS
@dataclass
class Aws:
    """Lazily made clients plus the clock; tests pass ``factory`` (moto / Stubber) and a fake ``sleep``."""

    region: str | None = None
    endpoint_url: str | None = None
    factory: Callable[[str], Any] | None = None
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    _made: dict = field(default_factory=dict)

    def client(self, service: str):
        """The boto3 client for ``service``; no credentials → exit 5 before any call."""
        if service not in self._made:
            self._made[service] = self.factory(service) if self.factory else self._default(service)
        return self._made[service]

    def _default(self, service: str):
        import boto3

        if "session" not in self._made:  # one session: its loader parses each service model once
            self._made["session"] = boto3.session.Session(region_name=self.region)
        session = self._made["session"]
        if session.get_credentials() is None:
            raise CliError("no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY", EXIT_AWS)
        return session.client(service, endpoint_url=self.endpoint_url)


def aws_error(client, operation: str, exc: Exception) -> CliError:
    """An AWS refusal as exit 5, naming the operation, AWS's reason and a missing permission."""
    if isinstance(exc, NoCredentialsError):
        return CliError("no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY", EXIT_AWS)
    if not isinstance(exc, ClientError):
        return CliError(f"{operation} failed: {exc}", EXIT_AWS)
    err = exc.response.get("Error", {})
    hint = ""
    if "AccessDenied" in err.get("Code", "") or "not authorized" in err.get("Message", ""):
        hint = f" (the caller needs permission for {client.meta.service_model.signing_name}:{exc.operation_name})"
    return CliError(f"{operation} refused: {err.get('Code')}: {err.get('Message')}{hint}", EXIT_AWS)


def call(client, operation: str, **params) -> dict:
    """One AWS call; any failure is exit 5 (see :func:`aws_error`)."""
    try:
        return getattr(client, operation)(**params)
    except (BotoCoreError, ClientError) as exc:
        raise aws_error(client, operation, exc) from None


def describe(sm, name: str) -> dict | None:
    """``describe_endpoint``, or None when there is no such endpoint."""
    try:
        return sm.describe_endpoint(EndpointName=name)
    except ClientError as exc:
        err = exc.response.get("Error", {})
        if err.get("Code") == "ValidationException" and "could not find" in err.get("Message", "").lower():
            return None
        raise aws_error(sm, "describe_endpoint", exc) from None
    except BotoCoreError as exc:
        raise aws_error(sm, "describe_endpoint", exc) from None


def wait_in_service(aws: Aws, o: Options, config_name: str | None, echo) -> dict:
    """Poll until the endpoint is InService (on ``config_name`` when given); Failed, a
    rolled-back update or the timeout are exit 3."""
    sm, deadline, last, seen_busy = aws.client("sagemaker"), aws.monotonic() + o.timeout, None, False
    while True:
        desc = describe(sm, o.name)
        if desc is None:
            raise CliError(f"endpoint {o.name!r} disappeared while waiting for it", EXIT_ENDPOINT)
        status, reason = desc.get("EndpointStatus", "Unknown"), desc.get("FailureReason")
        if status != last:
            echo(f"endpoint {o.name}: {status}")
            last = status
        on_config = config_name is None or desc.get("EndpointConfigName") == config_name
        if status == "InService" and on_config:
            return desc
        # back to InService on the old config after Updating, with a reason: SageMaker rolled the update back
        rolled_back = status == "InService" and seen_busy and bool(reason)
        seen_busy = seen_busy or status != "InService"
        if status in ("Failed", "OutOfService") or rolled_back:
            raise CliError(f"endpoint {o.name!r} is {status}{' after a rolled-back update' if status == 'InService' else ''}: "
                           f"{reason or 'no reason given'} (container logs: CloudWatch /aws/sagemaker/Endpoints/{o.name})", EXIT_ENDPOINT)
        if aws.monotonic() >= deadline:
            raise CliError(f"endpoint {o.name!r} still {status} after {o.timeout:.0f} s; it goes on: run again with --scaling-only "
                           "once it is InService to add autoscaling", EXIT_ENDPOINT)
        aws.sleep(POLL_SECONDS)


# ------------------------------------------------------------------ steps
def _stamp(aws: Aws) -> str:
    now = aws.now()
    return now.strftime("%Y%m%d-%H%M%S") + f"-{now.microsecond // 1000:03d}"


def _deregister_if_registered(aws: Aws, name: str, echo) -> None:
    aas = aws.client("application-autoscaling")
    ids = scaling_ids(name)
    found = call(aas, "describe_scalable_targets", ServiceNamespace="sagemaker", ResourceIds=[ids["ResourceId"]],
                 ScalableDimension=DIMENSION).get("ScalableTargets", [])
    if found:
        call(aas, "deregister_scalable_target", **ids)
        echo(f"autoscaling of {name}: deregistered (AWS refuses an instance-type change on a scalable target)")


def _deploy_model(o: Options, aws: Aws, current: dict | None, echo) -> dict:
    """create_model + create_endpoint_config, then create_endpoint or update_endpoint."""
    sm = aws.client("sagemaker")
    model = config = f"{o.name[:43]}-{_stamp(aws)}"
    call(sm, "create_model", **model_request(o, model))
    echo(f"model {model}: created")
    call(sm, "create_endpoint_config", **config_request(o, config, model))
    echo(f"endpoint config {config}: created")
    if current is None:
        try:
            sm.create_endpoint(EndpointName=o.name, EndpointConfigName=config)
        except ClientError as exc:
            if "already exist" in exc.response.get("Error", {}).get("Message", ""):
                raise CliError(f"endpoint {o.name!r} was created by someone else meanwhile; model and config {model} are left unused", EXIT_ENDPOINT) from None
            raise aws_error(sm, "create_endpoint", exc) from None
        except BotoCoreError as exc:
            raise aws_error(sm, "create_endpoint", exc) from None
        echo(f"endpoint {o.name}: create requested")
        return {"action": "created", "model": model, "endpoint_config": config}
    previous = current.get("EndpointConfigName")
    variants = call(sm, "describe_endpoint_config", EndpointConfigName=previous).get("ProductionVariants") or [{}]
    # same instance type: keep the instance count autoscaling chose (0 stays 0)
    retain = variants[0].get("InstanceType") == o.instance_type
    if not retain:
        _deregister_if_registered(aws, o.name, echo)
    call(sm, "update_endpoint", EndpointName=o.name, EndpointConfigName=config, RetainAllVariantProperties=retain)
    echo(f"endpoint {o.name}: update requested (was on {previous}, which is kept for a rollback)")
    return {"action": "updated", "model": model, "endpoint_config": config, "previous_endpoint_config": previous}


def apply_scaling(o: Options, aws: Aws, echo) -> dict:
    """Scalable target + backlog target tracking; with min 0 also the scale-out-from-zero step policy and alarm."""
    aas, cw = aws.client("application-autoscaling"), aws.client("cloudwatch")
    tracking, step, alarm = policy_names(o.name)
    call(aas, "register_scalable_target", **target_request(o))
    call(aas, "put_scaling_policy", **backlog_policy_request(o))
    done: dict[str, Any] = {"min": o.min_instances, "max": o.max_instances, "target_backlog_per_instance": o.target_backlog,
                            "policies": [tracking], "alarm": None}
    if o.min_instances == 0:
        arn = call(aas, "put_scaling_policy", **zero_policy_request(o))["PolicyARN"]
        call(cw, "put_metric_alarm", **zero_alarm_request(o, arn))
        done["policies"].append(step)
        done["alarm"] = alarm
    elif o.update or o.scaling_only:
        # an earlier deploy with --min-instances 0 left the scale-from-zero pair: remove it
        try:
            aas.delete_scaling_policy(PolicyName=step, **scaling_ids(o.name))
        except ClientError as exc:
            err = exc.response.get("Error", {})  # AWS says ObjectNotFound; moto a ValidationException "No scaling policy found"
            if err.get("Code") != "ObjectNotFoundException" and "no scaling policy found" not in err.get("Message", "").lower():
                raise aws_error(aas, "delete_scaling_policy", exc) from None
        except BotoCoreError as exc:
            raise aws_error(aas, "delete_scaling_policy", exc) from None
        call(cw, "delete_alarms", AlarmNames=[alarm])
    echo(f"autoscaling of {o.name}: {o.min_instances}..{o.max_instances} instances, target backlog {o.target_backlog:g} per instance"
         + (", scale-out from zero on HasBacklogWithoutCapacity" if o.min_instances == 0 else ""))
    return done


def deploy(o: Options, aws: Aws, echo) -> dict:
    """The whole run (not ``--dry-run``); returns the summary printed as JSON."""
    current = describe(aws.client("sagemaker"), o.name)
    status = current.get("EndpointStatus", "Unknown") if current else None
    result: dict[str, Any] = {"endpoint": o.name, "region": o.region}
    config = None
    if o.scaling_only:
        if current is None:
            raise CliError(f"endpoint {o.name!r} not found: create it first (run without --scaling-only)", EXIT_ENDPOINT)
    else:
        if current is not None and not o.update:
            raise CliError(f"endpoint {o.name!r} already exists ({status}): pass --update to deploy a new model and config to it, "
                           "or choose another --name", EXIT_ENDPOINT)
        if current is not None and status != "InService":
            fix = "delete it (aws sagemaker delete-endpoint) and run again" if status == "Failed" else "wait until it is InService"
            raise CliError(f"endpoint {o.name!r} is {status}: it can be updated only when InService; {fix}", EXIT_ENDPOINT)
        result.update(_deploy_model(o, aws, current, echo))
        config = result["endpoint_config"]
        if not o.wait:
            echo("not waiting (--no-wait): autoscaling is NOT configured; run again with --scaling-only once it is InService")
            return {**result, "status": "requested", "autoscaling": None}
    desc = wait_in_service(aws, o, config, echo)
    return {**result, "status": desc["EndpointStatus"], "autoscaling": apply_scaling(o, aws, echo)}


# ------------------------------------------------------------------ CLI
app = typer.Typer(add_completion=False, rich_markup_mode=None, help=__doc__.split("\n\n")[0])


def _profile_region() -> str | None:
    import boto3

    return boto3.session.Session().region_name  # reads ~/.aws/config, no network


@app.command()
@handled
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="Endpoint name (also ENDPOINT_NAME in job records).")],
    image: Annotated[str | None, typer.Option("--image", help="ECR image URI (buildspec.yml's image-uri.txt).")] = None,
    role: Annotated[str | None, typer.Option("--role", help="SageMaker execution role ARN (S3 read of the store, write of the output).")] = None,
    instance_type: Annotated[str, typer.Option("--instance-type")] = "ml.g5.xlarge",
    model_store: Annotated[str | None, typer.Option("--model-store", help="s3://bucket/prefix/ → MODEL_STORE.")] = None,
    output: Annotated[str | None, typer.Option("--output", help="s3://bucket/prefix/ → OUTPUT and the async S3OutputPath.")] = None,
    sns_success: Annotated[str | None, typer.Option("--sns-success", help="SNS topic ARN told of each success.")] = None,
    sns_error: Annotated[str | None, typer.Option("--sns-error", help="SNS topic ARN told of each failure.")] = None,
    max_concurrent: Annotated[int, typer.Option("--max-concurrent", help="Invocations per instance (one job per GPU).")] = 1,
    min_instances: Annotated[int, typer.Option("--min-instances", help="0 scales to zero when idle.")] = 0,
    max_instances: Annotated[int, typer.Option("--max-instances")] = 2,
    target_backlog: Annotated[float, typer.Option("--target-backlog", help="Queued jobs per instance autoscaling aims at.")] = 2.0,
    scale_in_cooldown: Annotated[int, typer.Option("--scale-in-cooldown", help="Seconds between scale-ins.")] = 600,
    scale_out_cooldown: Annotated[int, typer.Option("--scale-out-cooldown", help="Seconds between scale-outs (covers an instance's start).")] = 600,
    startup_timeout: Annotated[int, typer.Option("--startup-timeout", help="Seconds a new instance may take to answer /ping 200.")] = 900,
    env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE extra container setting (repeatable), e.g. DEFAULT_CHECKPOINT=x.safetensors.")] = None,
    region: Annotated[str | None, typer.Option("--region", envvar=["AWS_REGION", "AWS_DEFAULT_REGION"])] = None,
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="One endpoint URL for all three AWS APIs (tests, moto server).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for InService, then configure autoscaling (AWS needs InService).")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for InService.")] = 3600.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the API calls as JSON and exit; nothing is called.")] = False,
    update: Annotated[bool, typer.Option("--update", help="If the endpoint exists: new model + config, then update_endpoint.")] = False,
    scaling_only: Annotated[bool, typer.Option("--scaling-only", help="Only (re)configure autoscaling of an existing endpoint.")] = False,
):
    """Create the SageMaker async endpoint for this image, then autoscaling on its backlog
    (down to zero with --min-instances 0). Exit codes: 0 done; 2 bad input (nothing
    called); 3 endpoint exists without --update, missing, Failed or not InService in
    --timeout; 5 no credentials or an AWS refusal."""
    o = validate(name, image, role, model_store, output, region or _profile_region(), env,
                 instance_type=instance_type, sns_success=sns_success, sns_error=sns_error, max_concurrent=max_concurrent,
                 min_instances=min_instances, max_instances=max_instances, target_backlog=target_backlog,
                 scale_in_cooldown=scale_in_cooldown, scale_out_cooldown=scale_out_cooldown, startup_timeout=startup_timeout,
                 update=update, scaling_only=scaling_only, wait=wait, timeout=timeout)
    aws = ctx.obj if isinstance(ctx.obj, Aws) else Aws()
    aws.region, aws.endpoint_url = o.region, endpoint_url
    if dry_run:
        typer.echo(json.dumps(plan(o, _stamp(aws)), indent=2))
        return
    result = deploy(o, aws, lambda msg: typer.echo(msg, err=True))
    typer.echo(json.dumps(result, indent=2))


def main() -> None:
    """Console-script entry point (``sd-create-endpoint``)."""
    app()


if __name__ == "__main__":
    main()
