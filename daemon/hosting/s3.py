"""The S3 host: each scan uploaded to a bucket people already have, handed over as a presigned GET URL.

Works with AWS S3 and the S3-compatible services (Cloudflare R2, Backblaze B2, MinIO, ...). boto3 is
an optional extra (`pip install 'codeformer-daemon[s3]'`), imported only when this adapter starts.

Objects are named `<prefix><key>`: the random key the journal recorded, never the file's name. The
bucket stays private; the provider gets a presigned URL, which is a secret (it fetches the scan
without any other credential), so it is never logged: logs carry the bucket and `key_for_logs`.

Credentials: the systemd credentials `s3_access_key_id` and `s3_secret_access_key` (and, for
temporary keys, `s3_session_token`) when present, else boto3's standard chain: the AWS_*
environment variables, the shared profile `hosting.s3.profile`, an instance or task role. Every
secret is registered for masking as soon as it is known.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from ..config import S3HostConfig
from .base import HostingAdapter, HostingError, key_for_logs, open_for_upload
from .remote import read_credential, remove_orphans, tail

log = structlog.get_logger("daemon.hosting.s3")

EXTRA_HINT = "install the extra: pip install 'codeformer-daemon[s3]'"
CREDENTIAL_FILES = ("s3_access_key_id", "s3_secret_access_key", "s3_session_token")
MULTIPART_THRESHOLD = 16 * 1024 * 1024
"""Files above this go up in parts of MULTIPART_CHUNK (S3's minimum part is 5 MiB)."""
MULTIPART_CHUNK = 16 * 1024 * 1024
SIGNING_REGION_FOR_AUTO = "us-east-1"
"""R2 names its region 'auto'; SigV4 needs a real name, and R2 accepts us-east-1."""


def _import_boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise HostingError(f"hosting.adapter: s3 needs boto3, which is not installed; {EXTRA_HINT}") from None
    return boto3


class S3Host(HostingAdapter):
    """Publishes to `s3://bucket/prefix<key>`; unpublish deletes the object; sweep lists the prefix."""

    name = "s3"

    def __init__(self, settings: S3HostConfig, url_expiry: int, *, connect_timeout: float = 10.0,
                 read_timeout: float = 60.0, environ: Mapping[str, str] | None = None,
                 multipart_threshold: int = MULTIPART_THRESHOLD, multipart_chunk: int = MULTIPART_CHUNK) -> None:
        if not settings.bucket:
            raise HostingError("hosting.s3.bucket: required when hosting.adapter is s3")
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix.lstrip("/")
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"
        self.url_expiry = url_expiry
        self._timeouts = (connect_timeout, read_timeout)
        self._environ = os.environ if environ is None else environ
        self._multipart = (multipart_threshold, multipart_chunk)
        self._session: Any = None
        self._client: Any = None
        self._transfer: Any = None
        self._credentials_lock = threading.Lock()  # a boto3 session is not made for concurrent use

    @property
    def where(self) -> str:
        """The bucket and prefix in words, for errors: `s3://bucket/prefix at https://endpoint`."""
        at = f" at {self.settings.endpoint_url}" if self.settings.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{at}"

    def object_key(self, key: str) -> str:
        return self.prefix + key

    # -- lifecycle

    def start(self) -> None:
        if self._client is not None:
            return
        boto3 = _import_boto3()
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError

        self._session, source = self._make_session(boto3)
        self._register_credentials()
        region = self.settings.region
        if region == "auto":
            region = SIGNING_REGION_FOR_AUTO
        connect_timeout, read_timeout = self._timeouts
        boto_config = BotoConfig(
            signature_version="s3v4",
            s3={"addressing_style": self.settings.addressing_style},
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": 3},
            # Checksums only where S3 requires them: the newer defaults (CRC32 trailers on every
            # upload) are refused by several S3-compatible services.
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        try:
            self._client = self._session.client("s3", region_name=region, endpoint_url=self.settings.endpoint_url,
                                                config=boto_config)
        except (BotoCoreError, ValueError) as exc:
            raise HostingError(f"hosting.s3: cannot set up the client for {self.where}: {tail(str(exc))}") from None
        threshold, chunk = self._multipart
        self._transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=chunk,
                                        max_concurrency=4, use_threads=True)
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001 - every botocore failure is explained below
            self._client = None
            raise HostingError(f"hosting.s3.bucket: cannot use {self.where}: {self._explain(exc)}") from None
        log.info("hosting.started", adapter=self.name, bucket=self.bucket, prefix=self.prefix,
                 endpoint=self.settings.endpoint_url, region=self.settings.region, credentials=source,
                 url_expiry=self.url_expiry)

    def _make_session(self, boto3: Any) -> tuple[Any, str]:
        """A boto3 session and, in words, where its credentials come from (never the credentials)."""
        from botocore.exceptions import BotoCoreError

        found = {name: read_credential(name, self._environ) for name in CREDENTIAL_FILES}
        explicit: dict[str, str | None] = {}
        source = "the AWS credential chain"
        if found["s3_access_key_id"] or found["s3_secret_access_key"]:
            if not (found["s3_access_key_id"] and found["s3_secret_access_key"]):
                raise HostingError("credential s3_access_key_id: the systemd credentials s3_access_key_id and "
                                   "s3_secret_access_key go together (both or neither)")
            explicit = {"aws_access_key_id": found["s3_access_key_id"],
                        "aws_secret_access_key": found["s3_secret_access_key"],
                        "aws_session_token": found["s3_session_token"]}
            source = "systemd credentials s3_access_key_id and s3_secret_access_key"
        elif self.settings.profile:
            source = f"profile {self.settings.profile}"
        try:
            session = boto3.session.Session(profile_name=self.settings.profile, **explicit)
        except BotoCoreError as exc:  # ProfileNotFound and the like
            raise HostingError(f"hosting.s3.profile: {tail(str(exc))}") from None
        return session, source

    def _register_credentials(self) -> None:
        """Mask the credentials in use (again after a refresh: roles hand out new ones every hour)."""
        from botocore.exceptions import BotoCoreError

        from ..logging import register_secret

        try:
            with self._credentials_lock:
                credentials = self._session.get_credentials()
                frozen = credentials.get_frozen_credentials() if credentials is not None else None
        except BotoCoreError as exc:
            raise HostingError(f"hosting.s3: cannot load credentials: {tail(str(exc))}") from None
        if frozen is None:
            raise HostingError("hosting.s3: no credentials found: pass the systemd credentials s3_access_key_id "
                               "and s3_secret_access_key, set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                               "name a profile in hosting.s3.profile, or run with an instance role")
        for value in (frozen.access_key, frozen.secret_key, frozen.token):
            if value:
                register_secret(value)

    def stop(self) -> None:
        self._client = None  # published objects stay: the journal still needs them after a restart

    # -- the contract

    def publish(self, key: str, path: Path, content_type: str) -> str:
        client = self._started()
        self._register_credentials()
        object_key = self.object_key(key)
        with open_for_upload(path) as f:
            try:
                client.upload_fileobj(f, self.bucket, object_key, ExtraArgs={"ContentType": content_type},
                                      Config=self._transfer)
            except Exception as exc:  # noqa: BLE001 - botocore and s3transfer errors alike
                raise HostingError(f"upload of {key_for_logs(key)} to {self.where} failed: "
                                   f"{self._explain(exc, key)}") from None
        try:
            return client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": object_key},
                                                 ExpiresIn=self.url_expiry)
        except Exception as exc:  # noqa: BLE001
            raise HostingError(f"cannot sign a URL for {key_for_logs(key)}: {self._explain(exc, key)}") from None

    def unpublish(self, key: str) -> None:
        client = self._started()
        try:
            client.delete_object(Bucket=self.bucket, Key=self.object_key(key))  # a missing key is a 204 too
        except Exception as exc:  # noqa: BLE001
            raise HostingError(f"delete of {key_for_logs(key)} from {self.where} failed: "
                               f"{self._explain(exc, key)}") from None

    def sweep(self, keep: set[str]) -> int:
        """Delete objects of the daemon's key shape right under the prefix that `keep` does not name.

        Anything else under the prefix (other names, deeper "folders") is left alone.
        """
        client = self._started()
        names: list[str] = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                names.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
        except Exception as exc:  # noqa: BLE001
            raise HostingError(f"cannot list {self.where}: {self._explain(exc)}") from None
        # One by one: DeleteObjects needs checksums some S3-compatibles refuse.
        return remove_orphans(self, names, keep)

    # -- helpers

    def _started(self) -> Any:
        if self._client is None:
            raise HostingError("the s3 host is not started")
        return self._client

    def _explain(self, exc: BaseException, key: str | None = None) -> str:
        """What went wrong, in words that say what to fix; never a credential or a signed URL."""
        from botocore import exceptions as bx

        if isinstance(exc, bx.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchBucket"):
                return f"the bucket {self.bucket!r} does not exist (HTTP {status})"
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
                return (f"access denied ({code}): check the credentials, and that they may s3:ListBucket on the "
                        "bucket and s3:PutObject, s3:GetObject, s3:DeleteObject under the prefix")
            if code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
                return f"the bucket is in another region ({code}): set hosting.s3.region to the bucket's region"
            return f"{code or 'HTTP ' + str(status)}: {tail(str(error.get('Message', '')), hide=key)}"
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
            return f"the endpoint is unreachable: {tail(str(exc), hide=key)}"
        if isinstance(exc, bx.ReadTimeoutError):
            return f"the endpoint did not answer in time: {tail(str(exc), hide=key)}"
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
            return f"no usable credentials: {tail(str(exc))}"
        return f"{type(exc).__name__}: {tail(str(exc), hide=key)}"
