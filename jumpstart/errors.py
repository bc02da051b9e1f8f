"""AWS setup checks and AWS error translation: every failure becomes one readable line.

``SageMakerError`` carries a message meant for the user; the CLI prints it with ``fail``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from txt2img.errors import InputError

ROLE_ENV = "TXT2IMG_SAGEMAKER_ROLE"
DOCS = "docs/sagemaker.md"


class SageMakerError(InputError):
    """A SageMaker operation cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class AwsContext:
    """The boto3 session, region and (when needed) execution role every call here uses."""

    session: Any  # boto3.Session
    region: str
    role: str | None

    def client(self, service: str):
        return self.session.client(service, region_name=self.region)


def aws_context(region: str | None = None, role: str | None = None, need_role: bool = False) -> AwsContext:
    """Check credentials, region and role up front, so a missing one is one clear line, not a traceback."""
    import boto3
    from botocore.exceptions import ProfileNotFound

    try:
        session = boto3.Session(region_name=region) if region else boto3.Session()
    except ProfileNotFound as error:
        raise SageMakerError(
            f"{error}: set AWS_PROFILE to a profile of your AWS config (`aws configure list-profiles`), or unset it"
        ) from error
    if not session.region_name:
        raise SageMakerError(
            "no AWS region: pass --region (e.g. --region us-east-1), set AWS_REGION, or run `aws configure`"
        )
    with aws_errors("reading your AWS credentials"):  # a credential_process or SSO profile can fail here
        credentials = session.get_credentials()
    if credentials is None:
        raise SageMakerError(
            "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, choose a profile with "
            "AWS_PROFILE, or run `aws configure` (or `aws sso login`)"
        )
    role = role or os.environ.get(ROLE_ENV) or None
    if need_role:
        if role is None:
            raise SageMakerError(
                f"no SageMaker execution role: pass --role arn:aws:iam::ACCOUNT:role/NAME or set {ROLE_ENV} "
                f"(the permissions it needs are in {DOCS})"
            )
        if not (role.startswith("arn:aws") and ":role/" in role):
            raise SageMakerError(
                f"--role must be an IAM role ARN like arn:aws:iam::123456789012:role/NAME, got '{role}'"
            )
    return AwsContext(session=session, region=session.region_name, role=role)


def explain_client_error(error: Any, action: str, instance_type: str | None = None) -> str:
    """One line for a botocore ClientError raised while doing ``action``."""
    details = error.response.get("Error", {})
    code = details.get("Code", "")
    message = details.get("Message", str(error))
    lowered = message.lower()
    if code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation") or "not authorized" in lowered:
        return f"AWS denied {action}: {message}. Grant the permissions listed in {DOCS} to your user and role"
    if code in (
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
    ):
        return (
            f"AWS rejected your credentials while {action}: {message}. "
            "Refresh them (`aws configure` or `aws sso login`)"
        )
    if code == "ResourceLimitExceeded":
        quota = f" for {instance_type}" if instance_type else ""
        return (
            f"AWS quota reached{quota} while {action}: {message}. Delete unused endpoints "
            "(`txt2img endpoints list`) or request a higher quota in the Service Quotas console (Amazon SageMaker)"
        )
    if "already exist" in lowered:
        return f"{message}. Pick another --endpoint-name, or remove the old one with `txt2img endpoints delete NAME`"
    if code == "ValidationException" and "instance" in lowered and ("type" in lowered or "instancetype" in lowered):
        chosen = f" '{instance_type}'" if instance_type else ""
        return f"unsupported instance type{chosen} while {action}: {message}"
    if code in ("ThrottlingException", "Throttling"):
        return f"AWS is throttling requests while {action}: {message}. Wait a minute and retry"
    return f"AWS error while {action} ({code or type(error).__name__}): {message}"


@contextmanager
def aws_errors(action: str, instance_type: str | None = None) -> Iterator[None]:
    """Turn botocore failures inside the block into a SageMakerError with a readable message."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    try:
        yield
    except ClientError as error:
        raise SageMakerError(explain_client_error(error, action, instance_type)) from error
    except (NoCredentialsError, PartialCredentialsError) as error:
        raise SageMakerError(
            f"no usable AWS credentials while {action}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
            "or run `aws configure`"
        ) from error
    except NoRegionError as error:
        raise SageMakerError("no AWS region: pass --region or set AWS_REGION") from error
    except EndpointConnectionError as error:
        raise SageMakerError(f"cannot reach AWS while {action}: {error}. Check the network and the region") from error
    except BotoCoreError as error:
        raise SageMakerError(f"AWS client error while {action}: {error}") from error
