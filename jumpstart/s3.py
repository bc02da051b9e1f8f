"""S3 locations and uploads with progress: where txt2img puts model archives and training data."""

from __future__ import annotations

from pathlib import Path

from jumpstart.errors import AwsContext, SageMakerError, aws_errors


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); a SageMakerError for anything else."""
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise SageMakerError(f"expected an s3://bucket/... URI, got '{uri}'")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def join_s3(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *(part.strip("/") for part in parts)])


def default_s3_prefix(context: AwsContext) -> str:
    """``s3://sagemaker-<region>-<account>/txt2img``: SageMaker's default bucket, created when missing."""
    from botocore.exceptions import ClientError

    with aws_errors("looking up your AWS account"):
        account = context.client("sts").get_caller_identity()["Account"]
    bucket = f"sagemaker-{context.region}-{account}"
    s3 = context.client("s3")
    with aws_errors(f"preparing the S3 bucket {bucket}"):
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            arguments = {"Bucket": bucket}
            if context.region != "us-east-1":  # us-east-1 rejects an explicit location constraint
                arguments["CreateBucketConfiguration"] = {"LocationConstraint": context.region}
            s3.create_bucket(**arguments)
    return f"s3://{bucket}/txt2img"


def upload_files(context: AwsContext, files: list[tuple[Path, str]], description: str) -> None:
    """Upload (local path, s3 URI) pairs with one rich progress bar over all their bytes."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    s3 = context.client("s3")
    total = sum(path.stat().st_size for path, _ in files)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True, console=Console(stderr=True)) as progress, aws_errors(description):
        task = progress.add_task(description, total=total)
        for path, uri in files:
            bucket, key = split_s3_uri(uri)
            s3.upload_file(str(path), bucket, key, Callback=lambda sent: progress.advance(task, sent))
