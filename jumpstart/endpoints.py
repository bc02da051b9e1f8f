"""The endpoint client: list, invoke and delete endpoints that speak JumpStart's text-to-image JSON.

``invoke`` talks to a SageMaker endpoint (real-time or async) or, given a URL, to the local
``bentoml serve`` ``/invocations`` route; both answer ``application/json;jpeg``.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from jumpstart.autoscaling import remove_autoscaling, resource_id, scaling_ranges
from jumpstart.deploy import remove_resources
from jumpstart.errors import AwsContext, SageMakerError, aws_context, aws_errors
from jumpstart.polling import ASYNC_ANSWER, wait_for
from jumpstart.records import forget_endpoint, recorded_endpoints, recorded_region
from jumpstart.s3 import join_s3, split_s3_uri

CONTENT_TYPE = "application/json"
ACCEPT = "application/json;jpeg"
ASYNC_POLL_SECONDS = 5.0
ASYNC_TIMEOUT_SECONDS = 3600.0


@dataclass(frozen=True)
class EndpointInfo:
    """One endpoint as ``txt2img endpoints list`` shows it."""

    name: str
    region: str
    status: str
    model_id: str | None
    instance_type: str | None
    created: str | None
    current_instances: int | None = None
    desired_instances: int | None = None
    scaling: str | None = None  # "MIN-MAX" instances when registered with Application Auto Scaling


def _instance_counts(sagemaker, name: str) -> tuple[int | None, int | None, list[str]]:
    """Current and desired instances summed over the endpoint's variants, and the variants' names."""
    from botocore.exceptions import ClientError

    try:
        variants = sagemaker.describe_endpoint(EndpointName=name).get("ProductionVariants", [])
    except ClientError:  # deleted between the listing and now
        return None, None, []

    def total(key: str) -> int | None:
        counts = [variant[key] for variant in variants if key in variant]
        return sum(counts) if counts else None

    return total("CurrentInstanceCount"), total("DesiredInstanceCount"), [v["VariantName"] for v in variants]


def list_endpoints(region: str | None = None) -> list[EndpointInfo]:
    """Every endpoint in the region plus every recorded one elsewhere, with its catalog model,
    instance counts and autoscaling range."""

    context = aws_context(region)
    records = recorded_endpoints()
    regions = [context.region, *sorted({r.endpoint.region for r in records} - {context.region})]
    found: dict[tuple[str, str], EndpointInfo] = {}
    for each_region in regions:
        region_context = AwsContext(context.session, each_region, None)
        sagemaker = region_context.client("sagemaker")
        ranges = scaling_ranges(region_context)
        with aws_errors(f"listing endpoints in {each_region}"):
            for page in sagemaker.get_paginator("list_endpoints").paginate():
                for summary in page["Endpoints"]:
                    name = summary["EndpointName"]
                    current, desired, variants = _instance_counts(sagemaker, name)
                    scaled = [ranges[resource_id(name, v)] for v in variants if resource_id(name, v) in ranges]
                    found[(name, each_region)] = EndpointInfo(
                        name=name,
                        region=each_region,
                        status=summary["EndpointStatus"],
                        model_id=None,
                        instance_type=None,
                        created=summary["CreationTime"].isoformat(timespec="seconds"),
                        current_instances=current,
                        desired_instances=desired,
                        scaling=", ".join(f"{low}-{high}" for low, high in scaled) or None,
                    )
    for record in records:
        key = (record.endpoint.name, record.endpoint.region)
        listed = found.get(key)
        found[key] = EndpointInfo(
            name=record.endpoint.name,
            region=record.endpoint.region,
            status=listed.status if listed else "gone (deleted outside txt2img)",
            model_id=record.model_id,
            instance_type=record.endpoint.instance_type,
            created=record.endpoint.created.isoformat(timespec="seconds"),
            current_instances=listed.current_instances if listed else None,
            desired_instances=listed.desired_instances if listed else None,
            scaling=listed.scaling if listed else None,
        )
    return sorted(found.values(), key=lambda info: (info.region, info.name))


def request_body(prompt: str, **parameters) -> dict:
    """The JumpStart JSON request; parameters left as None are not sent."""
    return {"prompt": prompt, **{name: value for name, value in parameters.items() if value is not None}}


def decode_images(body: bytes) -> list[bytes]:
    """JPEG bytes of every image in a JumpStart ``application/json;jpeg`` response."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SageMakerError(f"the endpoint answered something that is not JSON: {body[:200]!r}") from error
    if not isinstance(payload, dict):
        raise SageMakerError("the endpoint's JSON answer is not an object")
    images = payload.get("generated_images")
    if images is None and "generated_image" in payload:
        images = [payload["generated_image"]]
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise SageMakerError(f"the endpoint's answer has no base64 'generated_images' (keys: {sorted(payload)})")
    try:
        return [base64.b64decode(image, validate=True) for image in images]
    except ValueError as error:
        raise SageMakerError("the endpoint's images are not valid base64") from error


def write_images(images: list[bytes], directory: Path, stem: str) -> list[Path]:
    """Write each JPEG as ``<stem>-<n>.jpg``, never overwriting an existing file."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for image in images:
        number = len(written)
        path = directory / f"{stem}-{number}.jpg"
        while path.exists():
            number += 1
            path = directory / f"{stem}-{number}.jpg"
        path.write_bytes(image)
        written.append(path)
    return written


def invoke_url(url: str, body: dict, timeout: float = 600.0) -> bytes:
    """POST the request to ``<url>/invocations`` (the local server) and return the response body.

    With env TXT2IMG_API_TOKEN set, the request carries it as the server's bearer token.
    """
    import os
    import urllib.error
    import urllib.request

    target = url.rstrip("/")
    if not target.endswith("/invocations"):
        target += "/invocations"
    if not target.startswith(("http://", "https://")):
        raise SageMakerError(f"--url must start with http:// or https://, got '{url}'")
    request = urllib.request.Request(
        target,
        data=json.dumps(body).encode("utf-8"),
        method="POST",
        headers={"Content-Type": CONTENT_TYPE, "Accept": ACCEPT},
    )
    if os.environ.get("TXT2IMG_API_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['TXT2IMG_API_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        detail = error.read()[:300].decode("utf-8", errors="replace")
        raise SageMakerError(f"{target} answered HTTP {error.code}: {detail}") from error
    except (urllib.error.URLError, OSError) as error:
        raise SageMakerError(f"cannot reach {target}: {error}. Is `bentoml serve` running?") from error


def _async_output_prefix(sagemaker, name: str) -> str | None:
    description = sagemaker.describe_endpoint(EndpointName=name)
    config = sagemaker.describe_endpoint_config(EndpointConfigName=description["EndpointConfigName"])
    async_config = config.get("AsyncInferenceConfig")
    return async_config["OutputConfig"]["S3OutputPath"] if async_config else None


def invoke_endpoint(context: AwsContext, name: str, body: dict) -> bytes:
    """Invoke a SageMaker endpoint; an async one gets its request and answer through S3."""
    sagemaker = context.client("sagemaker")
    with aws_errors(f"looking up endpoint {name}"):
        output_prefix = _async_output_prefix(sagemaker, name)
    runtime = context.client("sagemaker-runtime")
    payload = json.dumps(body).encode("utf-8")
    if output_prefix is None:
        with aws_errors(f"invoking endpoint {name}"):
            response = runtime.invoke_endpoint(EndpointName=name, ContentType=CONTENT_TYPE, Accept=ACCEPT, Body=payload)
        return response["Body"].read()
    return _invoke_async(context, runtime, name, payload, output_prefix)


def _invoke_async(context: AwsContext, runtime, name: str, payload: bytes, output_prefix: str) -> bytes:
    from botocore.exceptions import ClientError

    s3 = context.client("s3")
    # Requests go beside the results: <--output>/requests/ next to <--output>/output/.
    input_uri = join_s3(output_prefix.rstrip("/").rsplit("/", 1)[0], "requests", f"{uuid.uuid4().hex}.json")
    bucket, key = split_s3_uri(input_uri)
    with aws_errors(f"uploading the request for {name}"):
        s3.put_object(Bucket=bucket, Key=key, Body=payload, ContentType=CONTENT_TYPE)
    with aws_errors(f"invoking async endpoint {name}"):
        response = runtime.invoke_endpoint_async(
            EndpointName=name, InputLocation=input_uri, ContentType=CONTENT_TYPE, Accept=ACCEPT
        )
    output, failure = response["OutputLocation"], response.get("FailureLocation")

    def read(location: str | None) -> bytes | None:
        """The object at ``location``, or None while the endpoint has not written it."""
        if not location:
            return None
        bucket, key = split_s3_uri(location)
        try:
            return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def describe() -> dict:
        """The request's state in the shape of a SageMaker describe answer."""
        answer = read(output)
        if answer is not None:
            return {"Status": "Completed", "Answer": answer}
        error = read(failure)
        if error is not None:
            return {"Status": "Failed", "FailureReason": error[:300].decode(errors="replace")}
        return {"Status": "InProgress"}

    answered = wait_for(
        f"request to endpoint {name}",
        describe,
        ASYNC_ANSWER,
        poll_seconds=ASYNC_POLL_SECONDS,
        timeout_seconds=ASYNC_TIMEOUT_SECONDS,
        still_running=f"it may still appear at {output}",
    )
    return answered["Answer"]


def delete_endpoint(name: str, region: str | None = None) -> list[str]:
    """Delete the endpoint's autoscaling, the endpoint, its endpoint config and its models, and forget
    it; returns what was deleted."""
    from botocore.exceptions import ClientError

    context = aws_context(region or recorded_region(name))
    sagemaker = context.client("sagemaker")
    with aws_errors(f"looking up endpoint {name}"):
        try:
            description = sagemaker.describe_endpoint(EndpointName=name)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ValidationException":
                raise
            if forget_endpoint(name):
                raise SageMakerError(
                    f"endpoint {name} no longer exists in {context.region}; its record in the catalog was removed"
                ) from error
            raise SageMakerError(f"no endpoint named {name} in {context.region}") from error
        config_name = description["EndpointConfigName"]
        config = sagemaker.describe_endpoint_config(EndpointConfigName=config_name)
    models = tuple(variant["ModelName"] for variant in config["ProductionVariants"])
    variants = tuple(variant["VariantName"] for variant in config["ProductionVariants"])
    # Before the endpoint: a policy left behind would keep trying to scale a deleted variant.
    scaled, problems = remove_autoscaling(context, name, variants)
    problems += remove_resources(sagemaker, name, config_name, models)
    forget_endpoint(name)
    if problems:
        raise SageMakerError("; ".join(problems))
    return [
        *(f"autoscaling of {target}" for target in scaled),
        f"endpoint {name}",
        f"endpoint config {config_name}",
        *(f"model {model}" for model in models),
    ]
