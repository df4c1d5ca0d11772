"""S3 adapters: the adapter files directly under `s3://bucket/prefix/`, cached on disk.

The first fetch downloads into a temporary directory beside the cache entry and renames it
into place, so a concurrent fetch of the same adapter, or a crash, never leaves a half
adapter behind; later fetches reuse the entry without touching S3 (delete the directory to
refresh it). The entry is `<cache_root>/<bucket>/<prefix with '/' written %2F>`: flat, so
that one prefix's entry never lies inside another's.

boto3 is optional (the `s3` extra) and reads its endpoint, region and credentials from its
standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE …).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote

from loraxd.adapters.errors import (ADAPTER_FILES, CONFIG_FILE, WEIGHT_FILES, AdapterFetchError,
                                    check_adapter_dir)

_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_CONNECT_TIMEOUT_S = 10
_READ_TIMEOUT_S = 60


class S3Source:
    def __init__(self, *, cache_root: Path, max_adapter_bytes: int | None = None):
        self.cache_root = cache_root
        self.max_adapter_bytes = max_adapter_bytes  # larger weights are not downloaded

    def entry(self, bucket: str, prefix: str) -> Path:
        return self.cache_root / bucket / quote(prefix, safe="")

    def lookup(self, adapter_id: str) -> Path | None:
        entry = self.entry(*parse_s3_id(adapter_id))
        if (entry / CONFIG_FILE).is_file():
            return check_adapter_dir("s3", adapter_id, entry, roots=(self.cache_root,))
        return None

    def fetch(self, adapter_id: str) -> Path:
        cached = self.lookup(adapter_id)
        if cached is not None:
            return cached
        bucket, prefix = parse_s3_id(adapter_id)
        entry = self.entry(bucket, prefix)
        client = _client(adapter_id)
        try:
            keys = _adapter_keys(client, adapter_id, bucket, prefix, self.max_adapter_bytes)
            self._download(client, adapter_id, bucket, keys, entry)
        except AdapterFetchError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an AdapterFetchError
            raise _s3_error(adapter_id, bucket, exc) from exc
        return check_adapter_dir("s3", adapter_id, entry, roots=(self.cache_root,))

    def _download(self, client, adapter_id: str, bucket: str, keys: dict[str, str],
                  entry: Path) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
        try:
            for name, key in keys.items():
                client.download_file(bucket, key, str(tmp / name))
            try:
                os.rename(tmp, entry)
            except OSError:
                if not (entry / CONFIG_FILE).is_file():  # not a concurrent fetch that won
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def parse_s3_id(adapter_id: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix` or `bucket/prefix`."""
    rest = adapter_id.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise AdapterFetchError("s3", adapter_id,
                                "not an S3 location (expected s3://bucket/prefix or bucket/prefix)")
    if not prefix or any(part in ("", ".", "..") for part in prefix.split("/")):
        raise AdapterFetchError("s3", adapter_id, "the S3 location needs a prefix naming the "
                                "adapter's folder (s3://bucket/prefix), without '.', '..' or '//'")
    return bucket, prefix


def _client(adapter_id: str):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise AdapterFetchError("s3", adapter_id, "boto3 is not installed; install the s3 extra "
                                "(pip install 'loraxd[s3]')") from None
    config = Config(connect_timeout=_CONNECT_TIMEOUT_S, read_timeout=_READ_TIMEOUT_S,
                    retries={"max_attempts": 3, "mode": "standard"})
    try:
        return boto3.session.Session().client("s3", config=config)
    except Exception as exc:  # noqa: BLE001 - a bad environment (region, endpoint) ends here
        raise AdapterFetchError("s3", adapter_id, f"cannot create an S3 client: {exc}") from exc


def _adapter_keys(client, adapter_id: str, bucket: str, prefix: str,
                  max_bytes: int | None) -> dict[str, str]:
    """{file name: object key} of the adapter files directly under the prefix."""
    keys: dict[str, str] = {}
    num_objects = 0
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    for page in pages:
        for obj in page.get("Contents", ()):
            num_objects += 1
            name = obj["Key"][len(prefix) + 1:]
            if name in ADAPTER_FILES:
                keys[name] = obj["Key"]
            if max_bytes is not None and name in WEIGHT_FILES and obj.get("Size", 0) > max_bytes:
                raise AdapterFetchError("s3", adapter_id, f"{name} is {obj['Size']} bytes, more "
                                        f"than max_adapter_bytes ({max_bytes}); not downloaded")
    where = f"s3://{bucket}/{prefix}/"
    if num_objects == 0:
        raise AdapterFetchError("s3", adapter_id, f"no objects under {where}")
    if CONFIG_FILE not in keys:
        raise AdapterFetchError("s3", adapter_id, f"no {CONFIG_FILE} under {where} "
                                "(not a PEFT adapter)")
    if not any(name in keys for name in WEIGHT_FILES):
        raise AdapterFetchError("s3", adapter_id, f"no adapter weights "
                                f"({' or '.join(WEIGHT_FILES)}) under {where}")
    return keys


def _s3_error(adapter_id: str, bucket: str, exc: BaseException) -> AdapterFetchError:
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError,
                                     NoCredentialsError, PartialCredentialsError)
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "unknown"))
        if code == "NoSuchBucket":
            reason = f"the bucket {bucket!r} does not exist"
        elif code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                      "AllAccessDisabled", "ExpiredToken", "InvalidToken"):
            reason = f"access denied by S3 ({code})"
        elif code in ("NoSuchKey", "404"):
            reason = "an object disappeared during the download"
        else:
            reason = f"S3 error {code}: {error.get('Message', '')}"
    elif isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        reason = ("no usable AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                  "a profile or an instance role)")
    elif isinstance(exc, ConnectionError):
        reason = f"the S3 endpoint is unreachable ({type(exc).__name__})"
    elif isinstance(exc, BotoCoreError):
        reason = f"S3 error: {exc}"
    elif isinstance(exc, OSError):
        reason = f"cannot write the adapter cache: {exc.strerror or exc}"
    else:
        reason = f"S3 download failed: {type(exc).__name__}: {exc}"
    return AdapterFetchError("s3", adapter_id, reason)
