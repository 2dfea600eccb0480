"""S3 / MinIO object store on the ``minio`` SDK.

Atomicity and durability come from S3 itself: a PUT (or a completed multipart
upload) publishes the whole object at once and is acknowledged only once stored;
a failed multipart upload is aborted, so no partial object ever appears.

Uploads are sequential (``num_parallel_uploads=1``): memory is bounded by one
part (``part_size``, default 64 MiB) and a failed upload leaves no worker
threads behind. Every minio / urllib3 failure is translated into
:class:`~gateway.errors.StorageError` naming endpoint, bucket, key and S3 error code.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error, ServerError
from minio.helpers import MAX_PART_SIZE, MIN_PART_SIZE
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import MaxRetryError, ResponseError

from gateway.errors import (
    ConfigError,
    NotFound,
    ResidencyViolation,
    StorageError,
    ValidationError,
)
from gateway.hashing import DEFAULT_CHUNK_BYTES
from gateway.storage.base import ChunkReader, ObjectStore, check_read_args

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 64 * 1024 * 1024
"""Default multipart part size: objects larger than this are uploaded in parts."""

_T = TypeVar("_T")

_HINTS = {
    "NoSuchBucket": "create the bucket or set [storage.s3] create_bucket = true",
    "AccessDenied": "check [storage.s3] access_key/secret_key and the bucket policy",
    "InvalidAccessKeyId": "check [storage.s3] access_key",
    "SignatureDoesNotMatch": "check [storage.s3] secret_key and region",
    "AuthorizationHeaderMalformed": "check [storage.s3] region",
    "PermanentRedirect": "check [storage.s3] region and endpoint",
}


class _IteratorReader:
    """Minimal read()-able adapter over an iterator of bytes, holding one chunk at most."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buf = memoryview(b"")
        self._done = False
        self.count = 0
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise ValueError("unbounded read() is not supported; pass a size")
        while not self._buf and not self._done:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._done = True
                break
            except BaseException as exc:
                self.error = exc
                raise
            self._buf = memoryview(chunk).cast("B")
        out = bytes(self._buf[:size])
        self._buf = self._buf[size:]
        self.count += len(out)
        return out


def _root_reason(exc: BaseException) -> str:
    """The most specific human-readable cause of a urllib3 / socket failure."""
    seen: set[int] = set()
    current: BaseException | None = exc
    best = str(exc)
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        if isinstance(current, MaxRetryError) and current.reason is not None:
            best = str(current.reason)
            current = current.reason
            continue
        current = current.__cause__ or current.__context__
    return best.split(": ", 1)[-1] if best.startswith("<") else best


class S3Store(ObjectStore):
    """Objects in one bucket of an S3-compatible server (AWS S3, MinIO, ...).

    ``endpoint`` is ``host:port`` without scheme; ``secure`` selects https.
    ``timeout`` (seconds, connect and read) and ``retries`` configure the HTTP
    client; connection failures surface as :class:`StorageError` after
    ``retries`` retries with short exponential backoff.
    """

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool = True,
        region: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        create: bool = False,
        create_regions: frozenset[str] | None = None,
        timeout: float = 60.0,
        retries: int = 3,
    ) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ConfigError(
                f"S3 part size {part_size} bytes must be between 5 MiB and 5 GiB; "
                "check [storage.s3] part_size_mb"
            )
        if "://" in endpoint or "/" in endpoint:
            raise ConfigError(
                f"[storage.s3] endpoint {endpoint!r} must be host:port without scheme or path; "
                "use secure = true/false to choose https/http"
            )
        self._endpoint = endpoint
        self._bucket = bucket
        self._secure = secure
        self._configured_region = region or None
        self._part_size = part_size
        self._create = create
        self._create_regions = create_regions
        self._region: str | None = None
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            maxsize=10,
            retries=urllib3.Retry(
                total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        try:
            self._client = Minio(
                endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=region or None,
                http_client=self._http,
            )
        except ValueError as exc:
            raise ConfigError(f"[storage.s3] endpoint {endpoint!r} is not usable: {exc}") from exc

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def url(self) -> str:
        return f"{'https' if self._secure else 'http'}://{self._endpoint}"

    def describe(self) -> str:
        return f"s3://{self._bucket} at {self.url}"

    # -- errors -------------------------------------------------------------

    def _fail(self, action: str, key: str | None, exc: BaseException) -> NoReturn:
        where = f"S3 store {self.describe()}"
        what = f"{action} key {key}" if key is not None else action
        if isinstance(exc, S3Error):
            hint = _HINTS.get(exc.code or "", "")
            raise StorageError(
                f"{where} refused {what}: {exc.code}: {exc.message}" + (f"; {hint}" if hint else "")
            ) from exc
        if isinstance(exc, MaxRetryError) and isinstance(exc.reason, ResponseError):
            raise StorageError(
                f"{where} failed {what}: {exc.reason}; the server keeps failing, retry later"
            ) from exc
        if isinstance(exc, Urllib3HTTPError | ConnectionError | TimeoutError):
            raise StorageError(
                f"{where} unreachable while {what}: {_root_reason(exc)}; "
                "check [storage.s3] endpoint and that the server is running"
            ) from exc
        if isinstance(exc, ServerError):
            raise StorageError(
                f"{where} failed {what}: HTTP {exc.status_code}: {exc}; retry later"
            ) from exc
        raise StorageError(f"{where} failed {what}: {exc}") from exc

    def _call(self, action: str, key: str | None, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except (MinioException, Urllib3HTTPError, ConnectionError, TimeoutError) as exc:
            self._fail(action, key, exc)

    # -- lifecycle ----------------------------------------------------------

    def check(self) -> None:
        exists = self._call(
            "checking bucket", None, lambda: self._client.bucket_exists(self._bucket)
        )
        if not exists:
            if not self._create:
                raise StorageError(
                    f"S3 store {self.describe()}: bucket {self._bucket!r} does not exist; "
                    "create it or set [storage.s3] create_bucket = true"
                )
            location = self._configured_region or "us-east-1"
            if self._create_regions is not None and location not in self._create_regions:
                raise ResidencyViolation(
                    f"S3 store {self.describe()}: bucket {self._bucket!r} does not exist and "
                    f"create_bucket would create it in region {location!r}, but [residency] "
                    "allowed_storage_regions allows only "
                    f"{', '.join(sorted(self._create_regions))}; nothing was created. Set "
                    "[storage.s3] region to an allowed region, or change the policy"
                )
            self._call(
                "creating bucket",
                None,
                lambda: self._client.make_bucket(self._bucket, location=location),
            )
            log.info("created bucket %s in %s at %s", self._bucket, location, self.url)
        log.info("object store %s ready", self.describe())

    def region(self) -> str | None:
        """The bucket's location as reported by GetBucketLocation (cached)."""
        if self._region is None:
            self._region = self._call("reading bucket location", None, self._bucket_location)
        return self._region

    def _bucket_location(self) -> str:
        # minio has no public GetBucketLocation; this mirrors Minio._get_region but
        # always asks the server, even when a region was configured.
        response = self._client._url_open(
            "GET", "us-east-1", bucket_name=self._bucket, query_params={"location": ""}
        )
        text = ET.fromstring(response.data.decode()).text
        if not text:
            return "us-east-1"
        if text == "EU":
            return "eu-west-1"
        return text

    # -- writing ------------------------------------------------------------

    def put_file(self, key: str, path: Path) -> None:
        self.validate_key(key)
        try:
            self._call(
                "writing",
                key,
                lambda: self._client.fput_object(
                    self._bucket,
                    key,
                    str(path),
                    part_size=self._part_size,
                    num_parallel_uploads=1,
                ),
            )
        except OSError as exc:  # the caller's file (StorageError is not an OSError)
            raise StorageError(
                f"S3 store {self.describe()} could not read source file {path} for key {key}: "
                f"{exc.strerror or exc}"
            ) from exc
        log.debug("stored %s from %s in %s", key, path, self.describe())

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        self.validate_key(key)
        reader = _IteratorReader(chunks)
        try:
            self._client.put_object(
                self._bucket,
                key,
                reader,  # type: ignore[arg-type]  # only read() is used
                -1,
                part_size=self._part_size,
                num_parallel_uploads=1,
            )
        except BaseException as exc:
            if exc is reader.error:
                raise  # the caller's iterator failed: propagate unchanged
            if isinstance(exc, MinioException | Urllib3HTTPError | ConnectionError | TimeoutError):
                self._fail("writing", key, exc)
            raise
        log.debug("stored %s (%d bytes) in %s", key, reader.count, self.describe())
        return reader.count

    # -- reading ------------------------------------------------------------

    def open_read(
        self, key: str, offset: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> ChunkReader:
        check_read_args(key, offset, chunk_bytes)
        try:
            response = self._client.get_object(self._bucket, key, offset=offset)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                raise NotFound(f"object {key!r} not found in {self.describe()}") from exc
            if exc.code == "InvalidRange":
                total = self.size(key)
                if total is None:
                    raise NotFound(f"object {key!r} not found in {self.describe()}") from exc
                if offset == total:
                    return ChunkReader(iter(()), lambda: None)
                raise ValidationError(
                    f"read offset {offset} is past the end of object {key!r} "
                    f"({total} bytes) in {self.describe()}"
                ) from exc
            self._fail("reading", key, exc)
        except (MinioException, Urllib3HTTPError, ConnectionError, TimeoutError) as exc:
            self._fail("reading", key, exc)

        def release() -> None:
            response.close()
            response.release_conn()

        def chunks() -> Iterator[bytes]:
            while True:
                try:
                    chunk = response.read(chunk_bytes)
                except (Urllib3HTTPError, ConnectionError, TimeoutError) as exc:
                    self._fail("reading", key, exc)
                if not chunk:
                    return
                yield chunk

        return ChunkReader(chunks(), release)

    def size(self, key: str) -> int | None:
        self.validate_key(key)
        try:
            stat = self._client.stat_object(self._bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NotFound"):
                return None
            self._fail("reading size of", key, exc)
        except (MinioException, Urllib3HTTPError, ConnectionError, TimeoutError) as exc:
            self._fail("reading size of", key, exc)
        return int(stat.size or 0)

    def delete(self, key: str) -> None:
        self.validate_key(key)
        self._call("deleting", key, lambda: self._client.remove_object(self._bucket, key))
        log.debug("deleted %s from %s", key, self.describe())
