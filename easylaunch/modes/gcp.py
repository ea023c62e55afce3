"""``gcp``: a sweep packed on Compute Engine instances (Spot by default), outputs in Cloud Storage.

::

    # config file
    GCP_BUCKET_NAME = "my-bucket"              # or "gs://my-bucket/prefix"
    GCP_IMAGE_NAME = "debian-12-bookworm-v20241112"
    GCP_IMAGE_PROJECT = "debian-cloud"
    GCP_DEFAULT_KWARGS = {"project": "my-project", "zone": "us-west1-a", "instance_type": "n1-standard-4"}

    sweep = run_sweep(train, variants, exp_name="demo", mode="gcp", num_exps_per_instance=10,
                      gcp_kwargs={"zone": "us-west1-b"})

google-cloud-compute and google-cloud-storage (``pip install 'easylaunch[gcp]'``) are imported
only when this mode is used. The project comes from ``gcp_kwargs['project']``, else
``GCP_DEFAULT_KWARGS['project']``, else ``$CLOUDSDK_CORE_PROJECT`` or ``$GOOGLE_CLOUD_PROJECT``.
Credentials are Application Default Credentials; anonymous ones where an emulator is set
(``$STORAGE_EMULATOR_HOST`` for storage; config ``GCP_COMPUTE_ENDPOINT`` /
``$EASYLAUNCH_GCP_COMPUTE_ENDPOINT`` on http:// for Compute, e.g. ``python -m easylaunch.cloudsim gcp``).

Instances are ``scheduling.provisioningModel=SPOT`` with ``instanceTerminationAction=DELETE``
unless ``gcp_kwargs['preemptible']`` is False (standard) or ``provisioning_model='PREEMPTIBLE'``
(legacy ``scheduling.preemptible``); ``use_gpu`` adds ``guestAccelerators`` (``gpu_kwargs``:
``gpu_model``, ``num_gpu``) and ``onHostMaintenance=TERMINATE``. Labels carry the experiment and
batch; the startup script is :mod:`.cloud`'s boot script, a shutdown script syncs once more.
The Compute client's ``insert`` is followed by an explicit ``ZoneOperationsClient.wait`` (the
client's own ``operation.result()`` ignores a custom endpoint).
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..options import Option
from .cloud import CloudError, CloudMode, Provider

GOOGLE_API = "https://compute.googleapis.com"


def credential_places() -> str:
    """Where google.auth looked for Application Default Credentials, each with what is there
    (for the "no credentials" message). Never a value."""
    gac = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if gac:
        first = f"$GOOGLE_APPLICATION_CREDENTIALS (set to {gac}: {'exists' if os.path.exists(gac) else 'no such file'})"
    else:
        first = "$GOOGLE_APPLICATION_CREDENTIALS (not set)"
    config = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    adc = os.path.join(config, "application_default_credentials.json")
    return "; ".join(
        [
            first,
            f"{adc} ({'exists' if os.path.exists(adc) else 'no such file'}; written by `gcloud auth "
            "application-default login`, $CLOUDSDK_CONFIG moves it)",
            "the GCE / Cloud Run metadata server (none answered)",
        ]
    )


#: the instance's service-account scopes: the bucket, deleting itself, its logs
SCOPES = (
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/compute",
    "https://www.googleapis.com/auth/logging.write",
)
#: ``gcp_kwargs`` / ``GCP_DEFAULT_KWARGS`` keys this mode understands
GCP_KWARGS = (
    "project",
    "zone",
    "instance_type",
    "image_name",
    "image_project",
    "terminate",
    "preemptible",
    "provisioning_model",
    "gpu_kwargs",
    "disk_size_gb",
    "service_account",
    "network",
)
CAPACITY_REASONS = (
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
    "QUOTA_EXCEEDED",
    "quotaExceeded",
    "rateLimitExceeded",
    "RESOURCE_NOT_READY",
)
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
PROJECT_RE = re.compile(r"^[a-z][-a-z0-9]{4,28}[a-z0-9]$")


def label_value(text: str) -> str:
    """``text`` as a GCE label value: lowercase letters, digits, ``_`` and ``-``, at most 63."""
    return re.sub(r"[^a-z0-9_-]+", "-", str(text).lower())[:63]


def instance_name(text: str) -> str:
    """``text`` as a GCE instance name (``[a-z]([-a-z0-9]{0,61}[a-z0-9])?``)."""
    name = re.sub(r"[^a-z0-9-]+", "-", str(text).lower())
    if not name or not name[0].isalpha():
        name = "el-" + name
    name = name[:63].rstrip("-")
    return name or "easylaunch"


def labels_of(tags: Dict[str, str]) -> Dict[str, str]:
    """The launcher's tags as GCE labels (runs and ``Name`` go to metadata: labels cannot hold them)."""
    out = {}
    for key, value in tags.items():
        if key in ("Name", "easylaunch-runs"):
            continue
        k = label_value(key)
        if not k or not k[0].isalpha():
            k = "el-" + k
        out[k[:63]] = label_value(value)
    return out


def shutdown_script() -> str:
    """GCE's shutdown-script (run on preemption and stop): one more sync of every run."""
    return "\n".join(
        [
            "#!/bin/bash",
            "# easylaunch: one more sync of this instance's runs before it goes",
            'ROOT="${EASYLAUNCH_INSTANCE_ROOT:-/var/lib/easylaunch}"',
            '[ -f "$ROOT/cloud-spec.json" ] || exit 0',
            "PY=$(command -v python3 || command -v python) || exit 0",
            'ZIPS=$(ls "$ROOT"/.zips/*.zip 2>/dev/null | tr "\\n" ":")',
            'PYTHONPATH="$ZIPS" "$PY" -m easylaunch.cloud_agent sync --root "$ROOT" >>"$ROOT/shutdown.log" 2>&1',
            "",
        ]
    )


def _google_error(exc: Exception) -> Tuple[int, str]:
    """(HTTP code, reasons and message) of a google.api_core error."""
    code = int(getattr(exc, "code", 0) or 0)
    reasons = [
        str(getattr(e, "reason", "") or (e.get("reason") if isinstance(e, dict) else ""))
        for e in getattr(exc, "errors", []) or []
    ]
    return code, " ".join(r for r in reasons if r) + " " + str(getattr(exc, "message", exc))


def _imports() -> Any:
    try:
        from google.cloud import compute_v1
    except ImportError:
        raise ImportError(
            "mode 'gcp' needs google-cloud-compute and google-cloud-storage: pip install 'easylaunch[gcp]'"
        ) from None
    return compute_v1


class GcpProvider(Provider):
    """GCE + GCS through google-cloud-compute and google-cloud-storage."""

    name = "gcp"
    scheme = "gs"
    metadata_url = "http://metadata.google.internal"
    #: one metadata value may hold 256 KB
    metadata_limit = 256 * 1024
    bucket_key = "GCP_BUCKET_NAME"

    def __init__(self, settings: Any, options: Dict[str, Any]):
        super().__init__(settings, options)
        self.kw = self._kwargs()
        self._clients: Dict[str, Any] = {}
        self._storage: Any = None

    def _kwargs(self) -> Dict[str, Any]:
        defaults = dict(self.settings.get("GCP_DEFAULT_KWARGS") or {})
        given = dict(self.options.get("gcp_kwargs") or {})
        for where, d in (("GCP_DEFAULT_KWARGS", defaults), ("gcp_kwargs", given)):
            for key in d:
                if key not in GCP_KWARGS:
                    close = difflib.get_close_matches(key, GCP_KWARGS, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise ValueError(
                        f"mode 'gcp': unknown key {key!r} in {where}.{hint} Known keys: {', '.join(GCP_KWARGS)}"
                    )
        out = {**defaults, **given}
        if isinstance(defaults.get("gpu_kwargs"), dict) and isinstance(given.get("gpu_kwargs"), dict):
            out["gpu_kwargs"] = {**defaults["gpu_kwargs"], **given["gpu_kwargs"]}
        return out

    # -- endpoints and clients -------------------------------------------------------
    def compute_endpoint(self) -> Optional[str]:
        """The Compute API root when not Google's (config, then environment), else None."""
        url = self.settings.get("GCP_COMPUTE_ENDPOINT") or os.environ.get("EASYLAUNCH_GCP_COMPUTE_ENDPOINT")
        return str(url).rstrip("/") if url else None

    def _credentials(self, emulated: bool) -> Any:
        if emulated:
            from google.auth.credentials import AnonymousCredentials

            return AnonymousCredentials()
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        except DefaultCredentialsError:
            raise CloudError(
                f"mode 'gcp': no Google credentials found. google.auth looked at: {credential_places()}. "
                "Run `gcloud auth application-default login`, or set $GOOGLE_APPLICATION_CREDENTIALS to a "
                "service-account key file (an emulator: $STORAGE_EMULATOR_HOST and GCP_COMPUTE_ENDPOINT)"
            ) from None
        return creds

    def client(self, kind: str) -> Any:
        """A compute_v1 client (``Instances``, ``ZoneOperations``, ``Zones``, ...) for the endpoint."""
        if kind not in self._clients:
            compute_v1 = _imports()
            endpoint = self.compute_endpoint()
            kwargs: Dict[str, Any] = {
                "credentials": self._credentials(bool(endpoint and endpoint.startswith("http://")))
            }
            if endpoint:
                from google.api_core.client_options import ClientOptions

                kwargs["client_options"] = ClientOptions(api_endpoint=endpoint)
            self._clients[kind] = getattr(compute_v1, f"{kind}Client")(**kwargs)
        return self._clients[kind]

    def storage(self) -> Any:
        """The google-cloud-storage bucket object (anonymous against ``$STORAGE_EMULATOR_HOST``)."""
        if self._storage is None:
            try:
                from google.cloud import storage
            except ImportError:
                raise ImportError(
                    "mode 'gcp' needs google-cloud-storage: pip install 'easylaunch[gcp]'"
                ) from None
            emulated = bool(os.environ.get("STORAGE_EMULATOR_HOST"))
            client = storage.Client(
                project=self.kw.get("project") or self._env_project() or "easylaunch",
                credentials=self._credentials(emulated),
            )
            self._storage = client.bucket(self.bucket()[0])
        return self._storage

    @staticmethod
    def _env_project() -> Optional[str]:
        return os.environ.get("CLOUDSDK_CORE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT")

    def project(self) -> str:
        project = self.kw.get("project") or self._env_project()
        if not project:
            raise ValueError(
                "mode 'gcp': no GCP project: pass gcp_kwargs={'project': 'ID'}, set "
                "GCP_DEFAULT_KWARGS = {'project': 'ID', ...} in the config file, or set $CLOUDSDK_CORE_PROJECT "
                "(or $GOOGLE_CLOUD_PROJECT)"
            )
        if not PROJECT_RE.match(str(project)):
            raise ValueError(
                f"mode 'gcp': {project!r} is not a GCP project id (6-30 lowercase letters, digits, '-')"
            )
        return str(project)

    def zone(self) -> str:
        """``gcp_kwargs['zone']``, else config GCP_ZONE, else us-west1-a."""
        return str(self.kw.get("zone") or self.settings.get("GCP_ZONE") or "us-west1-a")

    def _place(self, resolved: Dict[str, Any]) -> Tuple[str, str]:
        """``(project, zone)`` of a launch, or of the config when there is none (cloud cleanup)."""
        return resolved.get("project") or self.project(), resolved.get("zone") or self.zone()

    # -- bucket ----------------------------------------------------------------------
    def bucket(self) -> Tuple[str, str]:
        name = self.settings.get("GCP_BUCKET_NAME")
        if not name:
            raise ValueError(
                "mode 'gcp' needs a bucket: set GCP_BUCKET_NAME = 'BUCKET' (or 'gs://BUCKET/PREFIX') in the config file"
            )
        text = str(name)
        if text.startswith("gs://"):
            text = text[5:]
        bucket, _, prefix = text.partition("/")
        if not re.match(r"^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$", bucket):
            raise ValueError(f"config GCP_BUCKET_NAME = {name!r}: {bucket!r} is not a bucket name")
        return bucket, prefix.strip("/")

    def head(self, key: str) -> Optional[int]:
        self.count("head")
        blob = self.storage().get_blob(key)
        return None if blob is None else int(blob.size or 0)

    def put(self, key: str, data: bytes) -> None:
        import base64
        import hashlib

        self.count("put")
        md5 = hashlib.md5(data)
        blob = self.storage().blob(key)
        blob.md5_hash = base64.b64encode(md5.digest()).decode()
        blob.upload_from_string(data, content_type="application/octet-stream")
        if blob.md5_hash and base64.b64decode(blob.md5_hash).hex() != md5.hexdigest():
            raise CloudError(f"GCS stored {key} with another checksum than {md5.hexdigest()}")

    def get(self, key: str) -> bytes:
        self.count("get")
        return self.storage().blob(key).download_as_bytes()

    def list(self, prefix: str) -> Dict[str, Tuple[int, str]]:
        import base64

        self.count("list")
        out: Dict[str, Tuple[int, str]] = {}
        for blob in self.storage().client.list_blobs(self.storage(), prefix=prefix):
            md5 = base64.b64decode(blob.md5_hash).hex() if blob.md5_hash else ""
            out[blob.name] = (int(blob.size or 0), md5)
        return out

    def delete(self, key: str) -> None:
        self.count("delete")
        from google.api_core import exceptions

        try:
            self.storage().blob(key).delete()
        except exceptions.NotFound:
            pass

    def check_bucket(self) -> None:
        from google.api_core import exceptions

        bucket, prefix = self.bucket()
        store = self.storage()
        try:
            store.reload()
        except exceptions.NotFound:
            raise CloudError(
                f"mode 'gcp': the bucket {bucket!r} of GCP_BUCKET_NAME does not exist. Create it "
                "(gcloud storage buckets create gs://BUCKET) or set GCP_BUCKET_NAME to one that exists"
            ) from None
        except Exception as exc:
            raise CloudError(
                f"mode 'gcp': the bucket {bucket!r} of GCP_BUCKET_NAME cannot be reached: {exc}"
            ) from None
        probe = f"{prefix}/.easylaunch-write-probe-{os.getpid()}".lstrip("/")
        try:
            blob = store.blob(probe)
            blob.upload_from_string(b"")
            blob.delete()
        except Exception as exc:
            raise PermissionError(
                f"mode 'gcp': the bucket {bucket!r} of GCP_BUCKET_NAME is not writable with these credentials "
                f"({exc}). Grant roles/storage.objectAdmin on it, or set GCP_BUCKET_NAME to a writable bucket"
            ) from None

    # -- compute ---------------------------------------------------------------------
    def _get(self, what: str, call: Any, not_found: str) -> Any:
        from google.api_core import exceptions

        try:
            return call()
        except exceptions.NotFound:
            raise ValueError(not_found) from None
        except exceptions.GoogleAPICallError as exc:
            raise CloudError(f"mode 'gcp': checking {what} failed: {exc}") from None

    def resolve(self, batch: Any, n_instances: int) -> Dict[str, Any]:
        _imports()
        compute_v1 = _imports()
        opts, settings, kw = self.options, self.settings, self.kw
        project = self.project()
        self.bucket()
        zone = self.zone()
        endpoint = self.compute_endpoint()
        from google.api_core import exceptions

        try:
            self.client("Zones").get(project=project, zone=zone)
        except exceptions.NotFound:
            try:
                zones = sorted(z.name for z in self.client("Zones").list(project=project))
            except Exception:
                zones = []
            close = difflib.get_close_matches(zone, zones, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"mode 'gcp': unknown zone {zone!r} in project {project!r}.{hint} "
                + (
                    f"Known zones: {', '.join(zones)}"
                    if zones
                    else "(gcp_kwargs / GCP_DEFAULT_KWARGS 'zone')"
                )
            ) from None
        except exceptions.GoogleAPICallError as exc:
            raise CloudError(
                f"mode 'gcp': checking zone {zone!r} of project {project!r} failed: {exc}"
            ) from None
        gpu = bool(opts.get("use_gpu"))
        image = kw.get("image_name") or settings.get("GCP_GPU_IMAGE_NAME" if gpu else "GCP_IMAGE_NAME")
        if not image:
            raise ValueError(
                "mode 'gcp': no image: set GCP_IMAGE_NAME (GCP_GPU_IMAGE_NAME for use_gpu) and GCP_IMAGE_PROJECT in "
                "the config file, or pass gcp_kwargs={'image_name': ..., 'image_project': ...}"
            )
        image_project = str(kw.get("image_project") or settings.get("GCP_IMAGE_PROJECT") or project)
        if str(image).startswith("family/"):
            family = str(image)[7:]
            found = self._get(
                "the image",
                lambda: self.client("Images").get_from_family(project=image_project, family=family),
                f"mode 'gcp': image family {family!r} not found in project {image_project!r} "
                "(GCP_IMAGE_NAME / GCP_IMAGE_PROJECT, or gcp_kwargs image_name / image_project)",
            )
        else:
            found = self._get(
                "the image",
                lambda: self.client("Images").get(project=image_project, image=str(image)),
                f"mode 'gcp': image {image!r} not found in project {image_project!r} "
                "(GCP_IMAGE_NAME / GCP_IMAGE_PROJECT, or gcp_kwargs image_name / image_project)",
            )
        source_image = f"projects/{image_project}/global/images/{found.name}"
        itype = str(
            opts.get("instance_type")
            or kw.get("instance_type")
            or settings.get("GCP_INSTANCE_TYPE")
            or "n1-standard-4"
        )
        self._get(
            "the machine type",
            lambda: self.client("MachineTypes").get(project=project, zone=zone, machine_type=itype),
            f"mode 'gcp': unknown machine type {itype!r} in zone {zone!r} (instance_type= or gcp_kwargs 'instance_type')",
        )
        accelerators: List[Dict[str, Any]] = []
        if gpu:
            g = dict(kw.get("gpu_kwargs") or {})
            model, count = str(g.get("gpu_model") or "nvidia-tesla-t4"), int(g.get("num_gpu") or 1)
            self._get(
                "the GPU model",
                lambda: self.client("AcceleratorTypes").get(
                    project=project, zone=zone, accelerator_type=model
                ),
                f"mode 'gcp': GPU model {model!r} is not offered in zone {zone!r} (gcp_kwargs gpu_kwargs.gpu_model)",
            )
            accelerators.append({"type": f"zones/{zone}/acceleratorTypes/{model}", "count": count})
        model = str(
            kw.get("provisioning_model") or ("SPOT" if kw.get("preemptible", True) else "STANDARD")
        ).upper()
        if model not in ("SPOT", "STANDARD", "PREEMPTIBLE"):
            raise ValueError(
                f"mode 'gcp': provisioning_model {model!r} must be SPOT, STANDARD or PREEMPTIBLE"
            )
        if kw.get("terminate") is False and isinstance(getattr(batch, "options", None), dict):
            batch.options["terminate"] = False  # doodad's GCP_DEFAULT_KWARGS['terminate']
        del compute_v1
        return {
            "project": project,
            "zone": zone,
            "region": zone.rsplit("-", 1)[0],
            "compute": endpoint or GOOGLE_API,
            "image": source_image,
            "instance_type": itype,
            "accelerators": accelerators,
            "provisioning_model": model,
            "disk_size_gb": int(kw.get("disk_size_gb") or 20),
            "service_account": str(
                kw.get("service_account") or settings.get("GCP_SERVICE_ACCOUNT") or "default"
            ),
            "network": str(kw.get("network") or "global/networks/default"),
            "notice_wait": 20,
            "notice_window": 30,  # a preemption notice: 30 s
        }

    def body(self, name: str, script: str, tags: Dict[str, str], resolved: Dict[str, Any]) -> Dict[str, Any]:
        """The Compute v1 ``Instance`` resource of one instance (plain JSON names)."""
        if not NAME_RE.match(name):
            name = instance_name(name)
        zone, model = resolved["zone"], resolved["provisioning_model"]
        scheduling: Dict[str, Any] = {"automaticRestart": False, "onHostMaintenance": "TERMINATE"}
        if model == "SPOT":
            scheduling.update(provisioningModel="SPOT", instanceTerminationAction="DELETE")
        elif model == "PREEMPTIBLE":
            scheduling.update(preemptible=True)
        else:
            scheduling.update(provisioningModel="STANDARD")
            if not resolved.get("accelerators"):
                scheduling.update(automaticRestart=True, onHostMaintenance="MIGRATE")
        items = [
            {"key": "startup-script", "value": script},
            {"key": "shutdown-script", "value": shutdown_script()},
            {"key": "easylaunch-exp", "value": tags.get("easylaunch-exp", "")},
            {"key": "easylaunch-batch", "value": tags.get("easylaunch-batch", "")},
            {"key": "easylaunch-runs", "value": tags.get("easylaunch-runs", "")},
        ]
        if resolved.get("accelerators"):
            items.append({"key": "install-nvidia-driver", "value": "True"})
        body: Dict[str, Any] = {
            "name": name,
            "machineType": f"zones/{zone}/machineTypes/{resolved['instance_type']}",
            "disks": [
                {
                    "boot": True,
                    "autoDelete": True,
                    "initializeParams": {
                        "sourceImage": resolved["image"],
                        "diskSizeGb": str(resolved.get("disk_size_gb") or 20),
                    },
                }
            ],
            "networkInterfaces": [
                {
                    "network": resolved.get("network") or "global/networks/default",
                    "accessConfigs": [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}],
                }
            ],
            "serviceAccounts": [
                {"email": resolved.get("service_account") or "default", "scopes": list(SCOPES)}
            ],
            "scheduling": scheduling,
            "metadata": {"items": items},
            "labels": labels_of(tags),
        }
        if resolved.get("accelerators"):
            body["guestAccelerators"] = [
                {"acceleratorType": a["type"], "acceleratorCount": int(a["count"])}
                for a in resolved["accelerators"]
            ]
        return body

    def create(self, name: str, script: str, tags: Dict[str, str], resolved: Dict[str, Any]) -> str:
        compute_v1 = _imports()
        from google.api_core import exceptions

        body = self.body(name, script, tags, resolved)
        project, zone = resolved["project"], resolved["zone"]
        self.count("insert")
        try:
            resource = compute_v1.Instance.from_json(_json(body), ignore_unknown_fields=False)
            op = self.client("Instances").insert_unary(project=project, zone=zone, instance_resource=resource)
            op = self._wait(op, project, zone)
        except exceptions.GoogleAPICallError as exc:
            code, text = _google_error(exc)
            if any(r in text for r in CAPACITY_REASONS) or code == 429:
                raise CloudError(
                    f"mode 'gcp': Compute Engine refused the instance ({text.strip()}). Try another zone or "
                    "instance_type (gcp_kwargs), preemptible=False, or ask for a higher quota"
                ) from None
            raise CloudError(f"mode 'gcp': instances.insert failed: {exc}") from None
        errors = list(op.error.errors) if op.error else []
        if errors:
            text = "; ".join(f"{e.code}: {e.message}" for e in errors)
            try:  # a failed insert may leave a half-made instance
                self.client("Instances").delete_unary(project=project, zone=zone, instance=body["name"])
            except Exception:
                pass
            if any(r in text for r in CAPACITY_REASONS):
                raise CloudError(
                    f"mode 'gcp': Compute Engine could not create the instance ({text}). Try another zone or "
                    "instance_type (gcp_kwargs), preemptible=False, or ask for a higher quota"
                )
            raise CloudError(f"mode 'gcp': creating instance {body['name']!r} failed: {text}")
        return str(body["name"])

    def _wait(self, op: Any, project: str, zone: str) -> Any:
        compute_v1 = _imports()
        ops = self.client("ZoneOperations")
        for _ in range(120):
            if op.status == compute_v1.Operation.Status.DONE:
                return op
            op = ops.wait(project=project, zone=zone, operation=op.name)
        raise CloudError(f"mode 'gcp': operation {op.name} in zone {zone} did not finish")

    def describe(self, ids: Sequence[str], resolved: Dict[str, Any]) -> Dict[str, str]:
        compute_v1 = _imports()
        out = {i: "missing" for i in ids}
        self.count("describe")
        request = compute_v1.ListInstancesRequest(
            project=resolved["project"], zone=resolved["zone"], filter='labels.easylaunch = "1"'
        )
        for inst in self.client("Instances").list(request=request):
            if inst.name in out:
                out[inst.name] = str(inst.status)
        return out

    def terminate(self, ids: Sequence[str], resolved: Dict[str, Any]) -> None:
        from google.api_core import exceptions

        project, zone = self._place(resolved)
        for name in ids:
            self.count("delete_instance")
            try:
                self.client("Instances").delete_unary(project=project, zone=zone, instance=name)
            except exceptions.NotFound:
                pass

    def strays(self, exp: Optional[str], resolved: Dict[str, Any]) -> List[Dict[str, Any]]:
        compute_v1 = _imports()
        flt = '(labels.easylaunch = "1")'
        if exp:
            flt += f' (labels.easylaunch-exp = "{label_value(exp)}")'
        project, zone = self._place(resolved)
        request = compute_v1.ListInstancesRequest(project=project, zone=zone, filter=flt)
        out = []
        # TERMINATED (stopped: its boot disk is still billed, e.g. one that powered itself off
        # without python3) is a stray too; a deleted instance is not listed at all
        for inst in self.client("Instances").list(request=request):
            meta = {i.key: i.value for i in inst.metadata.items} if inst.metadata else {}
            out.append(
                {
                    "id": inst.name,
                    "name": inst.name,
                    "state": str(inst.status),
                    "exp": meta.get("easylaunch-exp", inst.labels.get("easylaunch-exp", "")),
                    "batch": meta.get("easylaunch-batch", inst.labels.get("easylaunch-batch", "")),
                    "runs": meta.get("easylaunch-runs", ""),
                }
            )
        return out

    @classmethod
    def with_location(
        cls, options: Dict[str, Any], region: Optional[str] = None, zone: Optional[str] = None
    ) -> Dict[str, Any]:
        if region:
            raise ValueError(
                f"--region {region!r} is an option of --mode ec2; Compute Engine instances are listed per "
                "zone: pass --zone ZONE (default: GCP_DEFAULT_KWARGS['zone'] / gcp_kwargs of the launch)"
            )
        if not zone:
            return dict(options)
        return {**options, "gcp_kwargs": {**dict(options.get("gcp_kwargs") or {}), "zone": zone}}

    def location(self) -> str:
        return f"project {self.project()}, zone {self.zone()}"

    def console_hint(self, ident: str, resolved: Dict[str, Any]) -> str:
        zone = shlex.quote(resolved.get("zone") or self.zone())
        project = shlex.quote(resolved.get("project") or self.project())
        return (
            f"`gcloud compute instances get-serial-port-output {shlex.quote(ident)} --zone {zone} "
            f"--project {project}` (while the instance exists)"
        )

    def describe_plan(self, resolved: Dict[str, Any], n: int) -> List[str]:
        gpus = ", ".join(
            f"{a['count']} x {a['type'].rsplit('/', 1)[-1]}" for a in resolved.get("accelerators") or []
        )
        return [
            f"  project {resolved['project']}, zone {resolved['zone']}, image {resolved['image']}, "
            f"type {resolved['instance_type']}, {resolved['provisioning_model'].lower()}"
            + (f", GPUs {gpus}" if gpus else ""),
            "  (Compute Engine gives no prices through this API: see the Cloud Billing catalog)",
        ]


def _json(body: Dict[str, Any]) -> str:
    import json

    return json.dumps(body)


class GcpMode(CloudMode):
    """Compute Engine instances + Cloud Storage (see the module docstring)."""

    name = "gcp"
    provider_class = GcpProvider
    options = (
        Option(
            "gcp_kwargs",
            (dict,),
            None,
            "project, zone, instance_type, image_name, image_project, preemptible, gpu_kwargs, ... "
            "(over config GCP_DEFAULT_KWARGS)",
        ),
        *CloudMode.common_options,
    )


__all__ = ["GcpMode", "GcpProvider", "instance_name", "label_value", "labels_of", "shutdown_script"]
