"""The object-storage layer: one small interface over S3 and GCS, with the conditional writes the store needs.

``--store`` (and the other store arguments) accept a POSIX path, ``file:///path``, ``s3://bucket/prefix`` or
``gs://bucket/prefix``. A ``file://`` URL is the POSIX store (rename + flock). ``s3://`` and ``gs://`` go through
:class:`ObjectClient`, whose one non-trivial operation is a *conditional* write:

* S3: ``PutObject`` with ``If-None-Match: *`` (create only if absent) or ``If-Match: <ETag>`` (replace only the
  object this writer read); a failed condition is HTTP 412 ``PreconditionFailed`` (409
  ``ConditionalRequestConflict`` when two conditional writes race: retried).
* GCS: uploads with ``ifGenerationMatch=0`` (absent) or ``ifGenerationMatch=<generation>``; 412 when it fails.

Why not pyarrow.fs / fsspec: neither exposes those preconditions, and the compare-and-swap of CURRENT is the
store's whole writer rule on object storage. The clients are optional extras (``pip install qarm[s3]`` /
``qarm[gcs]``) imported on first use; the core install needs neither.

Configuration is the clients' own, nothing qarm-specific: S3 reads ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``; for MinIO, Ceph or a local test server), ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` or ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``; GCS reads
Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``), ``GOOGLE_CLOUD_PROJECT`` and
``STORAGE_EMULATOR_HOST``. ``QARM_S3_ADDRESSING_STYLE=path`` forces path-style S3 URLs (some S3-compatible
servers need it; a custom endpoint given as an IP address gets it automatically).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

OBJECT_SCHEMES = ("s3", "gs")


class PreconditionFailed(RuntimeError):
    """A conditional write was refused: the object exists (create) or is no longer the one read (replace)."""


class ObjectStorageError(RuntimeError):
    """The object store cannot be used (client library missing, bucket unreachable, bad URL)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object: its key (relative to the client's bucket), size, version token and modification time.

    ``token`` is what a conditional replace compares: the S3 ETag or the GCS generation.
    """

    key: str
    size: int
    token: str
    mtime: float


def is_object_url(location) -> bool:
    """True for ``s3://...`` / ``gs://...`` (as str; a Path never is one)."""
    return isinstance(location, str) and urlparse(location).scheme in OBJECT_SCHEMES


def local_path(location) -> Path:
    """A POSIX location as a Path: ``file:///x`` -> ``/x``; a plain path as it is. Object URLs are refused."""
    if is_object_url(location):
        raise ValueError(f"{location} is an object-storage URL, not a local path")
    text = os.fspath(location)
    if isinstance(text, str) and any(text.startswith(f"{scheme}:/") for scheme in OBJECT_SCHEMES):
        # pathlib folds "s3://b/p" into "s3:/b/p": a URL that went through Path(), never a folder named "s3:"
        raise ValueError(f"{text}: an object-storage URL that was turned into a path (its '//' folded); pass it "
                         f"as the string {text.replace(':/', '://', 1)}")
    if isinstance(text, str) and text.startswith("file://"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{text}: file:// URLs name a local path (file:///abs/path), not host {parsed.netloc}")
        return Path(unquote(parsed.path))
    return Path(text)


def split_url(url: str) -> tuple[str, str, str]:
    """``s3://bucket/a/b/`` -> ("s3", "bucket", "a/b") (the prefix without slashes at either end)."""
    parsed = urlparse(url)
    if parsed.scheme not in OBJECT_SCHEMES or not parsed.netloc:
        raise ValueError(f"not an object-storage URL: {url!r} (expected s3://bucket/prefix or gs://bucket/prefix)")
    return parsed.scheme, parsed.netloc, parsed.path.strip("/")


class ObjectClient:
    """Operations on the objects of one bucket. Keys are full keys inside the bucket (no leading slash)."""

    scheme = ""

    def __init__(self, bucket: str):
        self.bucket = bucket

    def url(self, key: str = "") -> str:
        return f"{self.scheme}://{self.bucket}/{key}"

    # each backend implements these
    def get(self, key: str) -> tuple[bytes, str] | None:
        """(body, token) of an object, or None when it does not exist."""
        raise NotImplementedError

    def put(self, key: str, data: bytes, *, if_absent: bool = False, if_token: str | None = None) -> str:
        """Write an object; returns its new token. Raises PreconditionFailed when a condition does not hold.

        Args:
            if_absent: create only (S3 If-None-Match: *, GCS ifGenerationMatch=0).
            if_token: replace only the object with this token (S3 If-Match: ETag, GCS ifGenerationMatch).
        """
        raise NotImplementedError

    def upload(self, key: str, path: Path) -> str:
        """Upload a local file (multipart where large); returns the token."""
        raise NotImplementedError

    def download(self, key: str, path: Path) -> None:
        """Download an object to ``path`` (written as is; the caller writes aside and renames)."""
        raise NotImplementedError

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Delete an object (no error when it is already gone)."""
        raise NotImplementedError

    def head(self, key: str) -> ObjectInfo | None:
        raise NotImplementedError


class S3Client(ObjectClient):
    """S3 (and S3-compatible servers) through boto3."""

    scheme = "s3"
    CONFLICT_RETRIES = 5  # 409 ConditionalRequestConflict: another conditional write on the key was in flight

    def __init__(self, bucket: str, client=None):
        super().__init__(bucket)
        self._s3 = client or s3_client()

    def get(self, key):
        from botocore.exceptions import ClientError

        try:
            resp = self._s3.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _s3_code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return resp["Body"].read(), resp["ETag"]

    def head(self, key):
        from botocore.exceptions import ClientError

        try:
            resp = self._s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _s3_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return ObjectInfo(key, int(resp["ContentLength"]), resp["ETag"], resp["LastModified"].timestamp())

    def put(self, key, data, *, if_absent=False, if_token=None):
        from botocore.exceptions import ClientError

        kwargs = {"Bucket": self.bucket, "Key": key, "Body": data}
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        if if_token is not None:
            kwargs["IfMatch"] = if_token
        for attempt in range(self.CONFLICT_RETRIES):
            try:
                return self._s3.put_object(**kwargs)["ETag"]
            except ClientError as exc:
                code = _s3_code(exc)
                if code in ("PreconditionFailed", "412") or (code in ("NoSuchKey", "404") and if_token is not None):
                    raise PreconditionFailed(f"{self.url(key)}: {code}") from None
                if code != "ConditionalRequestConflict" or attempt == self.CONFLICT_RETRIES - 1:
                    raise
                time.sleep(0.05 * 2 ** attempt)  # AWS: retry a 409; the retry then sees the winner (412)
        raise AssertionError("unreachable")

    SINGLE_PUT_MAX = 64 << 20  # larger files go up as multipart uploads (s3transfer), in parallel parts

    def upload(self, key, path):
        if os.path.getsize(path) > self.SINGLE_PUT_MAX:
            self._s3.upload_file(os.fspath(path), self.bucket, key)
            return self.head(key).token
        with open(path, "rb") as fh:
            return self._s3.put_object(Bucket=self.bucket, Key=key, Body=fh)["ETag"]

    def download(self, key, path):
        self._s3.download_file(self.bucket, key, os.fspath(path))

    def list(self, prefix):
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"], int(obj["Size"]), obj["ETag"], obj["LastModified"].timestamp())

    def delete(self, key):
        self._s3.delete_object(Bucket=self.bucket, Key=key)


def _s3_code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def s3_client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ObjectStorageError("s3:// stores need boto3: pip install 'qarm[s3]'") from None
    style = os.environ.get("QARM_S3_ADDRESSING_STYLE")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if style is None and endpoint and _is_ip_host(endpoint):
        style = "path"  # a virtual-host bucket name cannot be prefixed to an IP address
    config = Config(s3={"addressing_style": style} if style else {}, retries={"mode": "standard"})
    return boto3.session.Session().client("s3", config=config)


def _is_ip_host(url: str) -> bool:
    import ipaddress

    host = urlparse(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return True


class GCSClient(ObjectClient):
    """Google Cloud Storage through google-cloud-storage; the token is the object's generation.

    Not run against a real GCS API in this repository's tests (no offline GCS server implements generation
    preconditions); tests/feature_store/test_object_store.py checks the precondition mapping on a stub client.
    """

    scheme = "gs"

    def __init__(self, bucket: str, client=None, errors: tuple | None = None):
        """Args: client: a ``google.cloud.storage.Client`` (default: one from the environment); errors: its
        (NotFound, PreconditionFailed) exception classes (default: google.api_core's)."""
        super().__init__(bucket)
        if client is None:
            try:
                from google.cloud import storage
            except ImportError:
                raise ObjectStorageError("gs:// stores need google-cloud-storage: pip install 'qarm[gcs]'") from None
            client = storage.Client()
        if errors is None:
            from google.api_core import exceptions

            errors = (exceptions.NotFound, exceptions.PreconditionFailed)
        self._gcs = client
        self._bucket = client.bucket(bucket)
        self._not_found, self._precondition = errors

    def get(self, key):
        for _ in range(5):
            blob = self._bucket.get_blob(key)
            if blob is None:
                return None
            try:  # the body of exactly the generation read, so (body, token) always belong together
                return blob.download_as_bytes(if_generation_match=blob.generation), str(blob.generation)
            except (self._not_found, self._precondition):
                continue  # replaced or deleted between the two requests: read again
        raise ObjectStorageError(f"{self.url(key)} kept changing while being read")

    def head(self, key):
        blob = self._bucket.get_blob(key)
        if blob is None:
            return None
        return ObjectInfo(key, int(blob.size), str(blob.generation), blob.updated.timestamp())

    def put(self, key, data, *, if_absent=False, if_token=None):
        blob = self._bucket.blob(key)
        match = 0 if if_absent else (int(if_token) if if_token is not None else None)
        try:
            blob.upload_from_string(data, if_generation_match=match)
        except self._precondition:
            raise PreconditionFailed(f"{self.url(key)}: generation precondition failed") from None
        return str(blob.generation)

    def upload(self, key, path):
        blob = self._bucket.blob(key)
        blob.upload_from_filename(os.fspath(path))
        return str(blob.generation)

    def download(self, key, path):
        self._bucket.blob(key).download_to_filename(os.fspath(path))

    def list(self, prefix):
        for blob in self._gcs.list_blobs(self.bucket, prefix=prefix):
            yield ObjectInfo(blob.name, int(blob.size), str(blob.generation), blob.updated.timestamp())

    def delete(self, key):
        try:
            self._bucket.blob(key).delete()
        except self._not_found:
            pass


def client_for(url: str) -> tuple[ObjectClient, str]:
    """(client of the URL's bucket, the key prefix under which the store lives: '' or 'a/b/')."""
    scheme, bucket, prefix = split_url(url)
    client = S3Client(bucket) if scheme == "s3" else GCSClient(bucket)
    return client, (prefix + "/" if prefix else "")
