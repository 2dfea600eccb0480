"""Build the configured object store (the one place storage config is read)."""

from __future__ import annotations

import os

from gateway.config import NodeConfig
from gateway.errors import ConfigError
from gateway.storage.base import ObjectStore
from gateway.storage.filesystem import FilesystemStore


def open_store(cfg: NodeConfig) -> ObjectStore:
    st = cfg.storage
    if st.backend == "filesystem":
        return FilesystemStore(st.path)
    from gateway.storage.s3 import S3Store  # minio loads only for an S3 store

    s3 = st.s3
    secret = s3.secret_key
    if s3.secret_key_env:
        secret = os.environ.get(s3.secret_key_env, "")
        if not secret:
            raise ConfigError(
                f"{cfg.source}: storage.s3.secret_key_env names {s3.secret_key_env!r}, "
                "but that environment variable is empty or unset"
            )
    return S3Store(
        s3.endpoint,
        s3.bucket,
        s3.access_key,
        secret,
        secure=s3.secure,
        region=s3.region or None,
        part_size=s3.part_size_mb * 1024 * 1024,
        create=s3.create_bucket,
        create_regions=cfg.storage_regions,  # residency is checked before a bucket is made
    )
