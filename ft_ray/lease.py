"""A driver's hold on a run or sweep folder in object storage: a lease object.

Object stores have no locks, but S3 has conditional writes: `If-None-Match: *` creates the
lease only where there is none, `If-Match: <etag>` replaces it only if it is still the one
read. The holder renews its lease every RENEW_S seconds; one not renewed for LEASE_TTL_S
(measured by the store's clock: its `Date` against the object's `Last-Modified`) belonged to
a driver that died, and the next driver takes it over. A driver that finds a lease waits
while it could still lapse: if it is renewed meanwhile, its holder is alive and this driver
is refused; if it lapses, this driver takes it (a killed driver's relaunch, by a person or by
KubeRay, goes on within LEASE_TTL_S).
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import json
import os
import socket
import threading
import time
from typing import Any, Iterator

from ft_ray.config import InputError, StorageConfig
from ft_ray.console import LOG
from ft_ray.storage import StorageError

LEASE_TTL_S = 60.0  # a lease not renewed for this long is its dead holder's
RENEW_S = 15.0  # how often the holder renews it
POLL_S = 5.0  # how often a driver waiting for a lease to lapse looks at it again


def s3_client(storage: StorageConfig) -> Any:
    """A boto3 S3 client for `storage`'s endpoint and region (credentials from the
    environment, as pyarrow's), with the store's retries."""
    return _client(storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), storage.region or "us-east-1",
                   storage.max_attempts)


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, region: str, attempts: int) -> Any:
    """One client per store (boto3's clients are thread-safe; making one takes about 0.1 s)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name=region,
                        config=Config(retries={"max_attempts": attempts, "mode": "standard"},
                                      connect_timeout=10, read_timeout=60))


def _code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


class Lease:
    """The lease object at `s3://<bucket>/<key>` (see the module's docstring)."""

    def __init__(self, client: Any, bucket: str, key: str, uri: str):
        self.client, self.bucket, self.key, self.uri = client, bucket, key, uri
        self.etag: str | None = None
        self.renewals = 0
        self.holder = (f"pid {os.getpid()} on {socket.gethostname()} since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def read(self) -> tuple[str, str, float] | None:
        """(etag, holder, seconds since its last renewal by the store's clock), or None when
        there is no lease."""
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        body = got["Body"].read().decode("utf-8", errors="replace")
        try:
            holder = str(json.loads(body).get("holder", "unnamed"))
        except (ValueError, AttributeError):
            holder = body.strip() or "unnamed"
        now = got["ResponseMetadata"]["HTTPHeaders"].get("date")
        stamp = email.utils.parsedate_to_datetime(now).timestamp() if now else time.time()
        return got["ETag"], holder, max(0.0, stamp - got["LastModified"].timestamp())

    def _put(self, **condition: str) -> bool:
        """Writes the lease under `condition` (IfNoneMatch or IfMatch); False when the store
        refused it (another driver's lease is there, or it changed)."""
        from botocore.exceptions import ClientError

        self.renewals += 1  # the body, so the ETag (its MD5), changes at every renewal
        body = json.dumps({"holder": self.holder, "renewal": self.renewals}).encode()
        try:
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]
            return True
        except ClientError as e:
            if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404"):
                return False
            raise

    def acquire(self) -> None:
        """Takes the lease (waiting up to LEASE_TTL_S for one that is not renewed to lapse).
        A store without conditional writes, one that refuses them or one that ignores them,
        holds nothing: a warning says so.

        Raises:
            InputError: another driver holds it and renews it.
            StorageError: the store failed the requests after its retries.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        unlocked = "this run is not locked, so a second driver of it would not be refused"
        try:
            self._acquire()
            ignored = self._put(IfNoneMatch="*")  # a store that keeps the condition refuses it: the lease is there
        except ClientError as e:
            if _code(e) not in ("NotImplemented", "501", "InvalidArgument"):
                raise StorageError(f"cannot take the lease {self.where}: {e}") from e
            LOG.warning(f"{self.uri}: the store does not take conditional writes ({_code(e)}): {unlocked}")
            return
        except BotoCoreError as e:
            raise StorageError(f"cannot take the lease {self.where}: {e}") from e
        if ignored:
            LOG.warning(f"{self.uri}: the store ignores conditional writes (it wrote over a lease If-None-Match "
                        f"forbade): {unlocked}")
            with contextlib.suppress(Exception):  # a lease no driver would keep to
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
            return
        self._renewer = threading.Thread(target=self._renew, name="ft-ray-lease", daemon=True)
        self._renewer.start()

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def _acquire(self) -> None:
        seen: str | None = None
        waited_since = time.monotonic()
        while True:
            if self._put(IfNoneMatch="*"):
                return
            found = self.read()
            if found is None:
                continue  # released between the two requests: try again
            etag, holder, age = found
            refused = InputError(f"{self.uri} is being trained by another driver ({holder}): wait for it to end, "
                                 "or choose another run_name")
            if seen is not None and etag != seen:
                raise refused  # renewed while this driver waited: its holder is alive
            if age >= LEASE_TTL_S:
                if self._put(IfMatch=etag):
                    LOG.warning(f"{self.uri}: took over the lease of {holder}, not renewed for {age:.0f} s "
                                "(a driver that died)")
                    return
                raise refused  # another driver took it over first
            if seen is None:
                LOG.info(f"{self.uri} is held by {holder} (renewed {age:.0f} s ago): waiting up to "
                         f"{LEASE_TTL_S - age:.0f} s for it to lapse (a driver that died) or be renewed (one alive)")
            seen = etag
            if time.monotonic() - waited_since > 2 * LEASE_TTL_S:  # a store whose clock does not move
                raise refused
            time.sleep(min(POLL_S, max(0.05, LEASE_TTL_S - age)))

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                if not self._put(IfMatch=self.etag or ""):
                    LOG.error(f"{self.uri}: this driver's lease was taken over by another driver (it was not "
                              f"renewed for {LEASE_TTL_S:.0f} s): two drivers may now write this run")
                    return
            except Exception as e:  # the store unreachable: tried again at the next renewal
                LOG.warning(f"{self.uri}: could not renew this driver's lease ({type(e).__name__}: {e})")

    def release(self) -> None:
        """Stops renewing and deletes the lease if it is still this driver's."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            found = self.read()
            if found is not None and found[0] == self.etag:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:  # it lapses by itself
            LOG.warning(f"{self.uri}: could not remove this driver's lease ({type(e).__name__}: {e}); "
                        f"it lapses in {LEASE_TTL_S:.0f} s")


def object_lease(root: str, name: str, uri: str, storage: StorageConfig) -> Lease:
    """The lease `name` in the object-store folder `root` ("bucket/prefix")."""
    bucket, _, prefix = root.partition("/")
    return Lease(s3_client(storage), bucket, f"{prefix}/{name}" if prefix else name, uri)


@contextlib.contextmanager
def held(lease: Lease) -> Iterator[None]:
    lease.acquire()
    try:
        yield
    finally:
        lease.release()
