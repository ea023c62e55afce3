"""Target side of modes ``ec2`` and ``gcp``: buckets and instance metadata with the standard library.

What a cloud instance needs and nothing more, in Python 3.8+ without boto3 or google-cloud
(the instance's image has a plain ``python3``)::

    store = open_store("s3://bucket/prefix", region="us-east-1")   # or "gs://bucket/prefix"
    store.put("exp/run/status.json", data)     # Content-MD5 checked by the server, ETag compared
    store.get("exp/run/payload.pkl"); store.list("exp/"); store.delete(key)

Credentials are never passed in: S3 signs requests (SigV4) with ``$AWS_ACCESS_KEY_ID`` /
``$AWS_SECRET_ACCESS_KEY`` when set, else with the instance profile's temporary keys from the
instance metadata service (IMDSv2: a session token first); GCS uses the metadata server's
service-account token, none at all against an emulator (``$STORAGE_EMULATOR_HOST``).
Endpoints follow the SDKs: ``$AWS_ENDPOINT_URL`` (path-style addressing then), else the
region's; the metadata address is ``$EASYLAUNCH_METADATA_URL``, else the real one.

Every request is retried with backoff on connection errors, 5xx and 429 (a storage endpoint
restarting during an upload), up to ``RETRY_SECONDS``; a store's :meth:`Store.bounded` narrows
that for a while (the instance agent's final sync retries whole passes itself, each logged, and
must end inside a spot notice window).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from typing import Callable, Dict, Iterator, Optional, Tuple

AWS_METADATA = "http://169.254.169.254"
GCP_METADATA = "http://metadata.google.internal"
#: how long a request keeps being retried while the endpoint does not answer
RETRY_SECONDS = float(os.environ.get("EASYLAUNCH_STORE_RETRY_SECONDS", "180"))
TIMEOUT = 60.0


class StoreError(RuntimeError):
    """A storage or metadata request failed for good; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0, body: bytes = b""):
        super().__init__(message)
        self.status = status
        self.body = body


def metadata_url(provider: str) -> str:
    """The instance metadata address: ``$EASYLAUNCH_METADATA_URL``, else the provider's real one."""
    return os.environ.get("EASYLAUNCH_METADATA_URL") or (AWS_METADATA if provider == "aws" else GCP_METADATA)


def request(
    method: str,
    url: str,
    data: Optional[bytes] = None,
    headers: Optional[Dict[str, str]] = None,
    ok: Tuple[int, ...] = (200, 201, 204, 206),
    retry: bool = True,
    sign: Optional[Callable[[str, str, Dict[str, str], bytes], Dict[str, str]]] = None,
    timeout: float = TIMEOUT,
    retry_for: Optional[float] = None,
    deadline: Optional[float] = None,
) -> Tuple[int, bytes, Dict[str, str]]:
    """One HTTP request, retried on no answer / 5xx / 429; ``(status, body, headers)``.

    Retried for ``retry_for`` seconds (default ``RETRY_SECONDS``, 0 without ``retry``), never
    past ``deadline`` (a :func:`time.monotonic` time), which also shortens the socket timeout.
    A status outside ``ok`` that is not retried raises :class:`StoreError`. ``sign`` adds
    authorization headers (called again on each attempt: signatures carry the time)."""
    start = time.monotonic()
    give_up = start + (retry_for if retry_for is not None else (RETRY_SECONDS if retry else 0))
    if deadline is not None:
        give_up = min(give_up, deadline)
    delay = 0.2
    while True:
        hdrs = dict(headers or {})
        if sign is not None:
            hdrs = sign(method, url, hdrs, data or b"")
        req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
        wait = timeout if deadline is None else max(2.0, min(timeout, deadline - time.monotonic()))
        status, body, answer = 0, b"", {}
        try:
            with urllib.request.urlopen(req, timeout=wait) as resp:
                status, body, answer = resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            try:
                status, body, answer = err.code, err.read(), dict(err.headers or {})
            except (OSError, http.client.HTTPException):
                status, body, answer = err.code, b"", {}
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            # no answer, or half of one (an endpoint that died mid-response)
            if time.monotonic() >= give_up:
                raise StoreError(f"{method} {url}: no answer ({type(err).__name__}: {err})") from None
        if status in ok:
            return status, body, answer
        if status and not (status >= 500 or status == 429):
            raise StoreError(f"{method} {url}: HTTP {status}: {body[:300]!r}", status, body)
        if time.monotonic() >= give_up:
            if status:
                raise StoreError(f"{method} {url}: HTTP {status} until giving up", status, body)
            raise StoreError(f"{method} {url}: no answer until giving up")
        time.sleep(max(0.0, min(delay, give_up - time.monotonic())))
        delay = min(delay * 2, 5.0)


# -- AWS ----------------------------------------------------------------------------------


class ImdsV2:
    """The EC2 instance metadata service through IMDSv2 (a PUT for a session token first)."""

    def __init__(self, base: Optional[str] = None):
        self.base = (base or metadata_url("aws")).rstrip("/")
        self._token: Optional[str] = None
        self._token_at = 0.0

    def token(self) -> str:
        if self._token is None or time.time() - self._token_at > 3000:
            _, body, _ = request(
                "PUT",
                self.base + "/latest/api/token",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "3600"},
                retry=True,
            )
            self._token, self._token_at = body.decode(), time.time()
        return self._token

    def get(self, path: str, missing_ok: bool = False) -> Optional[str]:
        """The text at ``/latest/meta-data/<path>``; None for a 404 when ``missing_ok``."""
        try:
            _, body, _ = request(
                "GET",
                f"{self.base}/latest/meta-data/{path}",
                headers={"X-aws-ec2-metadata-token": self.token()},
                timeout=5,
            )
        except StoreError as err:
            if missing_ok and err.status == 404:
                return None
            raise
        return body.decode()


class AwsCredentials:
    """Keys from the environment, else the instance profile's from IMDS (refreshed before expiry)."""

    def __init__(self, imds: Optional[ImdsV2] = None):
        self.imds = imds
        self._cached: Optional[Tuple[str, str, Optional[str], float]] = None

    def get(self) -> Tuple[str, str, Optional[str]]:
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            return key, secret, os.environ.get("AWS_SESSION_TOKEN")
        if self._cached and self._cached[3] - time.time() > 300:
            return self._cached[:3]
        imds = self.imds or ImdsV2()
        role = (imds.get("iam/security-credentials/", missing_ok=True) or "").strip().splitlines()
        if not role:
            raise StoreError(
                "no AWS credentials: $AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY are not set and the "
                "instance has no IAM instance profile (instance metadata iam/security-credentials/)"
            )
        doc = json.loads(imds.get("iam/security-credentials/" + role[0]) or "{}")
        expires = time.time() + 3600
        try:
            stamp = datetime.datetime.strptime(doc.get("Expiration", ""), "%Y-%m-%dT%H:%M:%SZ")
            expires = stamp.replace(tzinfo=datetime.timezone.utc).timestamp()
        except ValueError:
            pass
        self._cached = (doc["AccessKeyId"], doc["SecretAccessKey"], doc.get("Token"), expires)
        return self._cached[:3]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sigv4(credentials: AwsCredentials, region: str, service: str):
    """A ``sign`` function for :func:`request`: AWS Signature Version 4 headers."""

    def sign(method: str, url: str, headers: Dict[str, str], body: bytes) -> Dict[str, str]:
        key, secret, token = credentials.get()
        parts = urllib.parse.urlsplit(url)
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload_hash = _sha256(body)
        out = dict(headers)
        out.update({"host": parts.netloc, "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash})
        if token:
            out["x-amz-security-token"] = token
        canon_headers = {k.lower(): " ".join(str(v).split()) for k, v in out.items()}
        signed = ";".join(sorted(canon_headers))
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        canon_query = "&".join(
            f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
            for k, v in sorted(query)
        )
        canon = "\n".join(
            [
                method,
                urllib.parse.quote(parts.path or "/", safe="/-_.~%"),
                canon_query,
                "".join(f"{k}:{canon_headers[k]}\n" for k in sorted(canon_headers)),
                signed,
                payload_hash,
            ]
        )
        scope = f"{day}/{region}/{service}/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, _sha256(canon.encode())])
        k = ("AWS4" + secret).encode()
        for part in (day, region, service, "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
        out.pop("host")  # urllib sets it
        out["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={key}/{scope}, SignedHeaders={signed}, Signature={signature}"
        )
        return out

    return sign


class Store:
    """A bucket under a prefix: keys are relative to the prefix."""

    url: str = ""
    #: while set by :meth:`bounded`: ``(retry_for, deadline)`` of every request
    limits: Tuple[Optional[float], Optional[float]] = (None, None)

    @contextlib.contextmanager
    def bounded(self, retry_for: Optional[float] = None, deadline: Optional[float] = None) -> Iterator[None]:
        """Within: each request is retried for ``retry_for`` seconds at most (0: tried once) and
        none outlives ``deadline`` (:func:`time.monotonic`)."""
        before = self.limits
        self.limits = (retry_for, deadline)
        try:
            yield
        finally:
            self.limits = before

    def _limits(self) -> Dict[str, Optional[float]]:
        return {"retry_for": self.limits[0], "deadline": self.limits[1]}

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> str:
        """Upload, verified by the server (MD5); returns the object's MD5 (hex)."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> Dict[str, Tuple[int, str]]:
        """``key -> (size, md5 hex)`` of every object under ``prefix``."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError


class S3Store(Store):
    """S3 (or moto) through its REST API, signed with SigV4."""

    def __init__(self, bucket: str, prefix: str, region: str, credentials: Optional[AwsCredentials] = None):
        self.bucket, self.prefix, self.region = bucket, prefix.strip("/"), region
        self.url = f"s3://{bucket}/{self.prefix}"
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            self.base = f"{endpoint.rstrip('/')}/{bucket}"
        else:
            self.base = f"https://{bucket}.s3.{region}.amazonaws.com"
        self.sign = sigv4(credentials or AwsCredentials(), region, "s3")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _url(self, key: str) -> str:
        return f"{self.base}/{urllib.parse.quote(self._key(key), safe='/-_.~')}"

    def get(self, key: str) -> bytes:
        return request("GET", self._url(key), sign=self.sign, **self._limits())[1]

    def put(self, key: str, data: bytes) -> str:
        md5 = hashlib.md5(data)
        headers = {
            "Content-MD5": base64.b64encode(md5.digest()).decode(),
            "Content-Type": "application/octet-stream",
        }
        _, _, answer = request(
            "PUT", self._url(key), data=data, headers=headers, sign=self.sign, **self._limits()
        )
        etag = {k.lower(): v for k, v in answer.items()}.get("etag", "").strip('"')
        if etag and etag != md5.hexdigest():
            raise StoreError(f"PUT {self._key(key)}: the stored checksum {etag} is not {md5.hexdigest()}")
        return md5.hexdigest()

    def list(self, prefix: str = "") -> Dict[str, Tuple[int, str]]:
        out: Dict[str, Tuple[int, str]] = {}
        full = self._key(prefix)
        token = None
        ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
        while True:
            query = {"list-type": "2", "prefix": full}
            if token:
                query["continuation-token"] = token
            _, body, _ = request(
                "GET", f"{self.base}?{urllib.parse.urlencode(query)}", sign=self.sign, **self._limits()
            )
            try:
                root = ET.fromstring(body)
            except ET.ParseError as err:
                raise StoreError(f"listing {full!r}: an answer that is not XML ({err})") from None
            strip = len(self.prefix) + 1 if self.prefix else 0
            for item in root.iter(f"{ns}Contents"):
                name = item.findtext(f"{ns}Key") or ""
                size = int(item.findtext(f"{ns}Size") or 0)
                out[name[strip:]] = (size, (item.findtext(f"{ns}ETag") or "").strip('"'))
            token = root.findtext(f"{ns}NextContinuationToken")
            if not token:
                return out

    def delete(self, key: str) -> None:
        request("DELETE", self._url(key), sign=self.sign, ok=(200, 204, 404), **self._limits())


def ec2_terminate(instance_id: str, region: str, credentials: Optional[AwsCredentials] = None) -> None:
    """TerminateInstances for this instance (the EC2 Query API, signed like S3)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_EC2") or os.environ.get("AWS_ENDPOINT_URL")
    url = (endpoint.rstrip("/") + "/") if endpoint else f"https://ec2.{region}.amazonaws.com/"
    body = urllib.parse.urlencode(
        {"Action": "TerminateInstances", "InstanceId.1": instance_id, "Version": "2016-11-15"}
    ).encode()
    request(
        "POST",
        url,
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        sign=sigv4(credentials or AwsCredentials(), region, "ec2"),
    )


# -- Google Cloud ------------------------------------------------------------------------------


class GceMetadata:
    """The GCE metadata server (``Metadata-Flavor: Google``)."""

    def __init__(self, base: Optional[str] = None):
        self.base = (base or metadata_url("gcp")).rstrip("/")

    def get(self, path: str, missing_ok: bool = False) -> Optional[str]:
        try:
            _, body, _ = request(
                "GET",
                f"{self.base}/computeMetadata/v1/{path}",
                headers={"Metadata-Flavor": "Google"},
                timeout=5,
            )
        except StoreError as err:
            if missing_ok and err.status == 404:
                return None
            raise
        return body.decode()

    def token(self) -> Optional[str]:
        doc = self.get("instance/service-accounts/default/token", missing_ok=True)
        return json.loads(doc)["access_token"] if doc else None


class GcsStore(Store):
    """Google Cloud Storage (or its emulator) through the JSON API."""

    def __init__(self, bucket: str, prefix: str, metadata: Optional[GceMetadata] = None):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"gs://{bucket}/{self.prefix}"
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        self.host = (emulator if emulator else "https://storage.googleapis.com").rstrip("/")
        if "://" not in self.host:
            self.host = "http://" + self.host
        self.metadata = None if emulator else (metadata or GceMetadata())
        self._token: Optional[Tuple[str, float]] = None

    def _headers(self) -> Dict[str, str]:
        if self.metadata is None:
            return {}
        if self._token is None or time.time() - self._token[1] > 1800:
            token = self.metadata.token()
            if not token:
                raise StoreError("no Google credentials: the instance has no service account")
            self._token = (token, time.time())
        return {"Authorization": f"Bearer {self._token[0]}"}

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _object(self, key: str) -> str:
        name = urllib.parse.quote(self._key(key), safe="")
        return f"{self.host}/storage/v1/b/{self.bucket}/o/{name}"

    def get(self, key: str) -> bytes:
        return request("GET", self._object(key) + "?alt=media", headers=self._headers(), **self._limits())[1]

    def put(self, key: str, data: bytes) -> str:
        md5 = hashlib.md5(data)
        query = urllib.parse.urlencode({"uploadType": "media", "name": self._key(key)})
        headers = {**self._headers(), "Content-Type": "application/octet-stream"}
        url = f"{self.host}/upload/storage/v1/b/{self.bucket}/o?{query}"
        _, body, _ = request("POST", url, data=data, headers=headers, **self._limits())
        stored = _json_doc(body, url).get("md5Hash")
        if stored and base64.b64decode(stored).hex() != md5.hexdigest():
            raise StoreError(f"upload of {self._key(key)}: the stored checksum does not match")
        return md5.hexdigest()

    def list(self, prefix: str = "") -> Dict[str, Tuple[int, str]]:
        out: Dict[str, Tuple[int, str]] = {}
        token = None
        strip = len(self.prefix) + 1 if self.prefix else 0
        while True:
            query = {"prefix": self._key(prefix)}
            if token:
                query["pageToken"] = token
            url = f"{self.host}/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(query)}"
            doc = _json_doc(request("GET", url, headers=self._headers(), **self._limits())[1], url)
            for item in doc.get("items") or []:
                md5 = item.get("md5Hash")
                out[item["name"][strip:]] = (
                    int(item.get("size") or 0),
                    base64.b64decode(md5).hex() if md5 else "",
                )
            token = doc.get("nextPageToken")
            if not token:
                return out

    def delete(self, key: str) -> None:
        request("DELETE", self._object(key), headers=self._headers(), ok=(200, 204, 404), **self._limits())


def _json_doc(body: bytes, what: str) -> Dict:
    """A JSON answer; a broken one (an endpoint that died mid-answer) is a StoreError."""
    try:
        doc = json.loads(body or b"{}")
    except ValueError as err:
        raise StoreError(f"{what}: an answer that is not JSON ({err})") from None
    return doc if isinstance(doc, dict) else {}


def terminate_self(provider: str, region: str, compute: str = "") -> None:
    """End this instance from inside it, through its metadata service and the cloud's API (the
    boot script calls it when it cannot start the agent: nothing else would end it)."""
    if provider == "aws":
        ec2_terminate(str(ImdsV2().get("instance-id")), region)
        return
    md = GceMetadata()
    zone = str(md.get("instance/zone")).rsplit("/", 1)[-1]
    gce_delete(compute, str(md.get("project/project-id")), zone, str(md.get("instance/name")), md)


def gce_delete(
    compute: str, project: str, zone: str, name: str, metadata: Optional[GceMetadata] = None
) -> None:
    """Delete this instance through the Compute API (``compute``: the API root URL)."""
    md = metadata or GceMetadata()
    try:
        token = md.token()
    except StoreError:
        token = None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{compute.rstrip('/')}/compute/v1/projects/{project}/zones/{zone}/instances/{name}"
    request("DELETE", url, headers=headers, ok=(200, 204, 404))


def open_store(url: str, region: str = "us-east-1") -> Store:
    """The store of an ``s3://bucket/prefix`` or ``gs://bucket/prefix`` URL."""
    scheme, _, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme == "s3":
        return S3Store(bucket, prefix, region)
    if scheme == "gs":
        return GcsStore(bucket, prefix)
    raise ValueError(f"unknown store URL {url!r} (s3://BUCKET/PREFIX or gs://BUCKET/PREFIX)")
