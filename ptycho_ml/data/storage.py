"""Local paths and ``s3://bucket/key`` URIs, through boto3 (docs/formats.md, "S3").

The endpoint comes from ``AWS_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL``
(for MinIO, moto or other S3-compatible stores); credentials from boto3's
usual chain. Inputs are downloaded once into a cache directory; outputs are
written locally and uploaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ptycho_ml.errors import PtychoInputError


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a local file's bytes (read in 4 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; a clear error when either is missing."""
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise PtychoInputError(f"{uri}: malformed S3 URI, expected s3://bucket/key")
    return bucket, key


def s3_client():
    try:
        import boto3
    except ImportError:  # pragma: no cover - boto3 is a runtime dependency
        raise PtychoInputError("s3:// paths need boto3: pip install 'ptycho_ml[s3]'") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    # A fresh session each time: boto3's default session caches the credentials it first resolved,
    # so a long-lived process would never see credentials rotated, added or removed afterwards.
    return boto3.session.Session().client("s3", endpoint_url=endpoint)


def _s3_error(uri: str, exc: Exception) -> PtychoInputError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return PtychoInputError(f"{uri}: no AWS credentials found, expected AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
    if isinstance(exc, EndpointConnectionError):
        return PtychoInputError(f"{uri}: cannot reach the S3 endpoint ({exc}), expected a running endpoint in AWS_ENDPOINT_URL/MLFLOW_S3_ENDPOINT_URL")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket",):
            return PtychoInputError(f"{uri}: bucket does not exist, expected an existing bucket")
        if code in ("NoSuchKey", "404", "NotFound"):
            return PtychoInputError(f"{uri}: no such key (or bucket) in S3, expected an existing object")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return PtychoInputError(f"{uri}: access denied ({code}), expected valid credentials with read/write permission")
        return PtychoInputError(f"{uri}: S3 error {code}: {exc}")
    return PtychoInputError(f"{uri}: S3 error: {exc}")


def cache_dir() -> Path:
    root = Path(os.environ.get("PTYCHO_ML_CACHE", Path(tempfile.gettempdir()) / "ptycho_ml_cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def local_path(uri: str) -> str:
    """A local file for ``uri``: the path itself, or a cached download of an S3 object."""
    if not is_s3(uri):
        return uri
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    client = s3_client()
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        if head.get("ContentLength", 0) == 0 and key.endswith("/"):
            raise PtychoInputError(f"{uri}: is a folder, expected an object")
        tag = hashlib.sha256(f"{uri}|{head.get('ETag')}|{head.get('ContentLength')}".encode()).hexdigest()[:16]
        target = cache_dir() / f"{tag}-{Path(key).name}"
        if not target.exists():
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".dl-")
            os.close(fd)
            try:
                client.download_file(bucket, key, tmp)
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
    except (ClientError, BotoCoreError) as exc:
        if isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            # head_object says 404 for a missing bucket too; tell the two apart.
            try:
                client.head_bucket(Bucket=bucket)
            except ClientError:
                raise PtychoInputError(f"{uri}: bucket '{bucket}' does not exist, expected an existing bucket") from None
        raise _s3_error(uri, exc) from None
    return str(target)


def upload(local: str | Path, uri: str) -> None:
    """Upload a local file to ``s3://bucket/key``."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        s3_client().upload_file(str(local), bucket, key)
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(uri, exc) from None
    except Exception as exc:  # boto3's S3UploadFailedError wraps ClientError
        cause = exc.__cause__ or exc.__context__
        if cause is not None and isinstance(cause, (ClientError, BotoCoreError)):
            raise _s3_error(uri, cause) from None
        if "NoSuchBucket" in str(exc):
            raise PtychoInputError(f"{uri}: bucket '{bucket}' does not exist, expected an existing bucket") from None
        raise


def check_bucket(bucket: str, uri: str) -> None:
    """A clear error now if ``bucket`` is missing or unreachable."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client().head_bucket(Bucket=bucket)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
            raise PtychoInputError(f"{uri}: bucket '{bucket}' does not exist, expected an existing bucket") from None
        raise _s3_error(uri, exc) from None
    except BotoCoreError as exc:
        raise _s3_error(uri, exc) from None


class OutputLocation:
    """A writable directory for a local path or an S3 prefix.

    Use as a context manager: files written under ``.path`` are uploaded to
    the S3 prefix on a clean exit (nothing is uploaded if an error occurred).
    """

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        if is_s3(self.uri):
            bucket, _ = split_s3(self.uri + "/x")  # validates the bucket part
            check_bucket(bucket, str(uri))  # fail before the work, not at upload
            self._tmp = tempfile.mkdtemp(prefix="ptycho_ml_out_")
            self.path = Path(self._tmp)
        else:
            self._tmp = None
            self.path = Path(self.uri)
            self.path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "OutputLocation":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._tmp is None:
            return
        try:
            if exc_type is None:
                for f in sorted(self.path.rglob("*")):
                    if f.is_file():
                        upload(f, f"{self.uri}/{f.relative_to(self.path).as_posix()}")
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def describe(self, name: str) -> str:
        return f"{self.uri}/{name}"
