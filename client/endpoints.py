"""SageMaker endpoints: list them, and check one is ready before anything is uploaded."""

from __future__ import annotations

from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from client.config import EXIT_AWS, EXIT_ENDPOINT, CliError


@dataclass(frozen=True)
class EndpointInfo:
    name: str
    status: str
    instance_type: str | None
    mode: str  # "async" or "real-time"


def _aws(exc: Exception, what: str) -> CliError:
    if isinstance(exc, NoCredentialsError):
        return CliError(f"no AWS credentials found for {what}: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY", EXIT_AWS)
    return CliError(f"SageMaker error during {what}: {exc}", EXIT_AWS)


def _not_found(exc: ClientError) -> bool:
    message = exc.response.get("Error", {}).get("Message", "")
    return exc.response.get("Error", {}).get("Code") == "ValidationException" and "not find" in message.lower()


def describe(sagemaker, name: str) -> dict:
    """``describe_endpoint``; a missing endpoint is exit 3 naming it."""
    try:
        return sagemaker.describe_endpoint(EndpointName=name)
    except ClientError as exc:
        if _not_found(exc):
            raise CliError(f"endpoint {name!r} not found (sdctl endpoints lists the ones there are)", EXIT_ENDPOINT) from None
        raise _aws(exc, f"describe_endpoint {name}") from None
    except BotoCoreError as exc:
        raise _aws(exc, f"describe_endpoint {name}") from None


def require_in_service(sagemaker, name: str) -> dict:
    """The endpoint's description if it is ``InService``; else exit 3 naming its status."""
    desc = describe(sagemaker, name)
    status = desc.get("EndpointStatus", "Unknown")
    if status != "InService":
        reason = f" ({desc['FailureReason']})" if desc.get("FailureReason") else ""
        raise CliError(f"endpoint {name!r} is {status}{reason}, not InService: nothing was submitted", EXIT_ENDPOINT)
    return desc


def info(sagemaker, name: str, desc: dict | None = None) -> EndpointInfo:
    """Status, instance type and mode of one endpoint (describe_endpoint + describe_endpoint_config)."""
    desc = desc or describe(sagemaker, name)
    instance_type, mode = None, "real-time"
    config_name = desc.get("EndpointConfigName")
    if config_name:
        try:
            config = sagemaker.describe_endpoint_config(EndpointConfigName=config_name)
        except (ClientError, BotoCoreError) as exc:
            raise _aws(exc, f"describe_endpoint_config {config_name}") from None
        variants = config.get("ProductionVariants") or []
        if variants:
            instance_type = variants[0].get("InstanceType") or ("serverless" if variants[0].get("ServerlessConfig") else None)
        if config.get("AsyncInferenceConfig"):
            mode = "async"
    return EndpointInfo(name=name, status=desc.get("EndpointStatus", "Unknown"), instance_type=instance_type, mode=mode)


def list_endpoints(sagemaker, name_contains: str | None = None) -> list[EndpointInfo]:
    """Every endpoint (all pages), newest first as SageMaker sorts them by default."""
    out: list[EndpointInfo] = []
    kwargs: dict = {"MaxResults": 100}
    if name_contains:
        kwargs["NameContains"] = name_contains
    try:
        while True:
            page = sagemaker.list_endpoints(**kwargs)
            for item in page.get("Endpoints", []):
                out.append(info(sagemaker, item["EndpointName"]))
            if not page.get("NextToken"):
                return out
            kwargs["NextToken"] = page["NextToken"]
    except (ClientError, BotoCoreError) as exc:
        raise _aws(exc, "list_endpoints") from None
