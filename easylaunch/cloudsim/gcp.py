"""cloudsim gcp: a Compute Engine v1 REST endpoint of its own, and the instances created there played.

    python -m easylaunch.cloudsim gcp --port 9024 --storage http://127.0.0.1:9023

It serves, at ``http://127.0.0.1:PORT/compute/v1/...``, what mode ``gcp`` calls: instances
insert / get / list (``filter`` on labels, name, status) / delete, zoneOperations get / wait,
zones get / list, machineTypes get, acceleratorTypes get, images get / getFromFamily, from a
fixed catalogue (:data:`ZONES`, :data:`MACHINE_TYPES`, :data:`ACCELERATORS`, :data:`IMAGES`).
An ``instances.insert`` body is checked against the Compute v1 ``Instance`` field names and
shapes (:data:`INSTANCE`) and its rules (names, labels, metadata sizes, Spot scheduling, GPUs);
anything else is refused with a 400 in Google's error format, as the real API does.

Each created instance is played: its ``startup-script`` runs for real (an
:class:`~easylaunch.cloudsim.players.InstancePlayer`) with ``$STORAGE_EMULATOR_HOST`` at the
GCS emulator and a metadata server of its own (``Metadata-Flavor: Google`` required: instance
name/id/zone, attributes, ``preempted``, a service-account token made up at start). A control
endpoint on 127.0.0.1 (printed at start, ``--control-port``) delivers faults::

    POST /preempt?name=NAME&window=30    preempted=TRUE, the shutdown-script runs; gone `window` s later
    POST /kill?name=NAME                 the VM dies now, without notice
    POST /fail?reason=ZONE_RESOURCE_POOL_EXHAUSTED&after=1&http=0
                                         the insert after `after` more ends with that error (in the
                                         operation, or as an HTTP error when `http` is a status)
    GET  /instances                      what is being played;  GET /planted: the token it hands out
    GET  /requests                       the Compute requests received (method, path, body)
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

from .players import Answer, HttpServer, Sim, json_answer, text_answer

ZONES = ("us-west1-a", "us-west1-b", "us-central1-a", "us-central1-f", "us-east1-b", "europe-west4-a")
MACHINE_TYPES = {
    "e2-micro": 2,
    "e2-small": 2,
    "e2-medium": 2,
    "e2-standard-2": 2,
    "e2-standard-4": 4,
    "n1-standard-1": 1,
    "n1-standard-2": 2,
    "n1-standard-4": 4,
    "n1-standard-8": 8,
    "n2-standard-2": 2,
    "n2-standard-4": 4,
    "g2-standard-4": 4,
}
ACCELERATORS = ("nvidia-tesla-t4", "nvidia-tesla-k80", "nvidia-tesla-p4", "nvidia-l4")
#: project -> image name -> family
IMAGES = {
    "debian-cloud": {
        "debian-12-bookworm-v20241112": "debian-12",
        "debian-11-bullseye-v20241112": "debian-11",
    },
    "ubuntu-os-cloud": {"ubuntu-2204-jammy-v20241119": "ubuntu-2204-lts"},
    "deeplearning-platform-release": {"common-cu121-v20241118-debian-11": "common-cu121-debian-11"},
}

# -- the Instance resource's shape (Compute v1) ------------------------------------------------
S, I64, I32, B, ANY = "string", "int64", "int32", "boolean", "any"
MAP = "map<string,string>"


def enum(*values: str) -> Tuple[str, ...]:
    return values


ACCESS_CONFIG = {
    "kind": S,
    "name": S,
    "type": enum("ONE_TO_ONE_NAT", "DIRECT_IPV6"),
    "natIP": S,
    "networkTier": enum("PREMIUM", "STANDARD", "FIXED_STANDARD", "STANDARD_OVERRIDES_FIXED_STANDARD"),
    "setPublicPtr": B,
    "publicPtrDomainName": S,
    "externalIpv6": S,
    "externalIpv6PrefixLength": I32,
}
INSTANCE: Dict[str, Any] = {
    "kind": S,
    "id": I64,
    "name": S,
    "description": S,
    "machineType": S,
    "minCpuPlatform": S,
    "canIpForward": B,
    "deletionProtection": B,
    "hostname": S,
    "labels": MAP,
    "labelFingerprint": S,
    "resourcePolicies": [S],
    "privateIpv6GoogleAccess": enum(
        "INHERIT_FROM_SUBNETWORK",
        "ENABLE_OUTBOUND_VM_ACCESS_TO_GOOGLE",
        "ENABLE_BIDIRECTIONAL_ACCESS_TO_GOOGLE",
    ),
    "keyRevocationActionType": enum("NONE", "STOP", "KEY_REVOCATION_ACTION_TYPE_UNSPECIFIED"),
    "tags": {"items": [S], "fingerprint": S},
    "disks": [
        {
            "kind": S,
            "type": enum("PERSISTENT", "SCRATCH"),
            "mode": enum("READ_WRITE", "READ_ONLY"),
            "source": S,
            "deviceName": S,
            "index": I32,
            "boot": B,
            "autoDelete": B,
            "interface": enum("SCSI", "NVME"),
            "diskSizeGb": I64,
            "initializeParams": {
                "diskName": S,
                "sourceImage": S,
                "diskSizeGb": I64,
                "diskType": S,
                "labels": MAP,
                "description": S,
                "provisionedIops": I64,
                "provisionedThroughput": I64,
                "resourcePolicies": [S],
                "architecture": enum("X86_64", "ARM64"),
            },
            "guestOsFeatures": [{"type": S}],
        }
    ],
    "networkInterfaces": [
        {
            "kind": S,
            "network": S,
            "subnetwork": S,
            "networkIP": S,
            "name": S,
            "nicType": enum("GVNIC", "VIRTIO_NET", "IDPF"),
            "stackType": enum("IPV4_ONLY", "IPV4_IPV6", "IPV6_ONLY"),
            "queueCount": I32,
            "accessConfigs": [ACCESS_CONFIG],
            "ipv6AccessConfigs": [ACCESS_CONFIG],
            "aliasIpRanges": [{"ipCidrRange": S, "subnetworkRangeName": S}],
        }
    ],
    "serviceAccounts": [{"email": S, "scopes": [S]}],
    "scheduling": {
        "onHostMaintenance": enum("MIGRATE", "TERMINATE"),
        "automaticRestart": B,
        "preemptible": B,
        "provisioningModel": enum("SPOT", "STANDARD"),
        "instanceTerminationAction": enum("DELETE", "STOP", "INSTANCE_TERMINATION_ACTION_UNSPECIFIED"),
        "minNodeCpus": I32,
        "locationHint": S,
        "terminationTime": S,
        "maxRunDuration": {"seconds": I64, "nanos": I32},
        "nodeAffinities": [{"key": S, "operator": enum("IN", "NOT_IN"), "values": [S]}],
    },
    "metadata": {"kind": S, "fingerprint": S, "items": [{"key": S, "value": S}]},
    "guestAccelerators": [{"acceleratorType": S, "acceleratorCount": I32}],
    "shieldedInstanceConfig": {"enableSecureBoot": B, "enableVtpm": B, "enableIntegrityMonitoring": B},
    "confidentialInstanceConfig": {"enableConfidentialCompute": B},
    "displayDevice": {"enableDisplay": B},
    "reservationAffinity": {
        "consumeReservationType": enum("ANY_RESERVATION", "NO_RESERVATION", "SPECIFIC_RESERVATION"),
        "key": S,
        "values": [S],
    },
    "advancedMachineFeatures": {
        "enableNestedVirtualization": B,
        "threadsPerCore": I32,
        "visibleCoreCount": I32,
    },
}
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
META_KEY_RE = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


class ApiError(Exception):
    """An error answer in the Compute API's format."""

    def __init__(self, code: int, message: str, reason: str = "invalid", status: str = ""):
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason
        self.status = status or {
            400: "INVALID_ARGUMENT",
            403: "PERMISSION_DENIED",
            404: "NOT_FOUND",
            409: "ALREADY_EXISTS",
        }.get(code, "FAILED_PRECONDITION")

    def body(self) -> Dict[str, Any]:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
                "status": self.status,
            }
        }


def check_shape(value: Any, spec: Any, where: str) -> None:
    """``value`` has the Compute v1 JSON shape ``spec``; ApiError 400 naming the first mismatch."""
    if spec == ANY:
        return
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ApiError(
                400, f"Invalid value at '{where}': expected an object, got {json.dumps(value)[:80]}"
            )
        for key, sub in value.items():
            if key not in spec:
                raise ApiError(
                    400,
                    f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}': Cannot find field.",
                )
            check_shape(sub, spec[key], f"{where}.{key}")
        return
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise ApiError(400, f"Invalid value at '{where}': expected a list, got {json.dumps(value)[:80]}")
        for i, item in enumerate(value):
            check_shape(item, spec[0], f"{where}[{i}]")
        return
    if isinstance(spec, tuple):
        if value not in spec:
            raise ApiError(
                400, f"Invalid value at '{where}' ({json.dumps(value)[:80]}): not one of {', '.join(spec)}"
            )
        return
    ok = {
        S: isinstance(value, str),
        B: isinstance(value, bool),
        I32: isinstance(value, int) and not isinstance(value, bool),
        I64: (isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(value, str) and value.isdigit()),
        MAP: isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
    }[spec]
    if not ok:
        raise ApiError(400, f"Invalid value at '{where}' (TYPE_{spec.upper()}), {json.dumps(value)[:80]}")


def _last(path: str, kind: str) -> Optional[Tuple[str, str]]:
    """``(zone or project, name)`` of a partial or full resource URL of ``kind``."""
    m = re.search(rf"(?:zones|projects)/([^/]+)(?:/global)?/{kind}/([^/]+)$", path)
    return (m.group(1), m.group(2)) if m else None


def check_instance(body: Dict[str, Any], project: str, zone: str) -> None:
    """The rules of instances.insert beyond the shape."""
    check_shape(body, INSTANCE, "instance")
    name = body.get("name") or ""
    if not NAME_RE.match(name):
        raise ApiError(
            400,
            f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex '(?:[a-z](?:[-a-z0-9]{{0,61}}[a-z0-9])?)'",
        )
    mt = _last(body.get("machineType") or "", "machineTypes")
    if not mt:
        raise ApiError(
            400,
            "Invalid value for field 'resource.machineType': "
            f"'{body.get('machineType')}'. It must be zones/ZONE/machineTypes/TYPE",
        )
    if mt[0] != zone or mt[1] not in MACHINE_TYPES:
        raise ApiError(
            400,
            f"Invalid value for field 'resource.machineType': '{body['machineType']}'. Machine type with name '{mt[1]}' does not exist in zone '{zone}'.",
        )
    disks = body.get("disks") or []
    boots = [d for d in disks if d.get("boot")]
    if len(boots) != 1:
        raise ApiError(400, "Invalid value for field 'resource.disks': exactly one boot disk is required")
    image = (boots[0].get("initializeParams") or {}).get("sourceImage") or ""
    found = _last(image, "images")
    if not found or found[1] not in IMAGES.get(found[0], {}):
        raise ApiError(404, f"The resource '{image}' was not found", "notFound")
    if not body.get("networkInterfaces"):
        raise ApiError(
            400,
            "Invalid value for field 'resource.networkInterfaces': at least one network interface is required",
        )
    labels = body.get("labels") or {}
    if len(labels) > 64:
        raise ApiError(400, "Invalid value for field 'resource.labels': at most 64 labels")
    for k, v in labels.items():
        if not LABEL_KEY_RE.match(k) or not LABEL_VALUE_RE.match(v):
            raise ApiError(
                400,
                f"Invalid value for field 'resource.labels': '{k}': '{v}'. Label keys and values may "
                "only contain lowercase letters, digits, '_' and '-' (keys start with a letter), at most 63 characters",
            )
    items = (body.get("metadata") or {}).get("items") or []
    total = 0
    seen = set()
    for item in items:
        key, value = item.get("key", ""), item.get("value", "")
        if not META_KEY_RE.match(key):
            raise ApiError(400, f"Invalid value for field 'resource.metadata.items[].key': '{key}'")
        if key in seen:
            raise ApiError(400, f"Invalid value for field 'resource.metadata': duplicate key '{key}'")
        seen.add(key)
        size = len(value.encode())
        if size > 256 * 1024:
            raise ApiError(
                400,
                f"Invalid value for field 'resource.metadata.items[].value' of '{key}': {size} bytes, the limit is 262144",
            )
        total += size + len(key)
    if total > 512 * 1024:
        raise ApiError(
            400, f"Invalid value for field 'resource.metadata': {total} bytes in all, the limit is 524288"
        )
    sched = body.get("scheduling") or {}
    if sched.get("provisioningModel") == "SPOT" or sched.get("preemptible"):
        if sched.get("automaticRestart", True):
            raise ApiError(
                400,
                "Invalid value for field 'resource.scheduling.automaticRestart': 'true'. Preemptible and Spot instances cannot be automatically restarted.",
            )
        if sched.get("onHostMaintenance", "MIGRATE") != "TERMINATE":
            raise ApiError(
                400,
                "Invalid value for field 'resource.scheduling.onHostMaintenance': 'MIGRATE'. Preemptible and Spot instances cannot be migrated.",
            )
    if sched.get("provisioningModel") == "SPOT" and sched.get("preemptible") is False:
        raise ApiError(
            400,
            "Invalid value for field 'resource.scheduling.preemptible': 'false'. Spot instances are preemptible.",
        )
    if (
        sched.get("instanceTerminationAction")
        and sched.get("provisioningModel") != "SPOT"
        and not sched.get("maxRunDuration")
    ):
        raise ApiError(
            400,
            "Invalid value for field 'resource.scheduling.instanceTerminationAction': only Spot instances have one",
        )
    for i, acc in enumerate(body.get("guestAccelerators") or []):
        found = _last(acc.get("acceleratorType") or "", "acceleratorTypes")
        if not found or found[0] != zone or found[1] not in ACCELERATORS:
            raise ApiError(
                400,
                f"Invalid value for field 'resource.guestAccelerators[{i}].acceleratorType': '{acc.get('acceleratorType')}'. Accelerator type does not exist in zone '{zone}'.",
            )
        if int(acc.get("acceleratorCount") or 0) < 1:
            raise ApiError(400, f"Invalid value for field 'resource.guestAccelerators[{i}].acceleratorCount'")
        if sched.get("onHostMaintenance", "MIGRATE") != "TERMINATE":
            raise ApiError(
                400,
                "Instances with guest accelerators do not support live migration: set scheduling.onHostMaintenance to TERMINATE.",
            )
    for sa in body.get("serviceAccounts") or []:
        if not sa.get("email"):
            raise ApiError(400, "Invalid value for field 'resource.serviceAccounts[0].email'")


def match_filter(inst: Dict[str, Any], text: str) -> bool:
    """The Compute list ``filter`` subset: ``FIELD = "V"`` / ``!=``, ANDed (parentheses or ``AND``)."""
    text = (text or "").strip()
    if not text:
        return True
    terms = re.findall(
        r'\(?\s*([a-zA-Z][\w.-]*)\s*(=|!=|eq|ne)\s*"?([^"()]*?)"?\s*\)?(?:\s+AND\s+|\s+|$)', text
    )
    rebuilt = " ".join(f"{f}{o}{v}" for f, o, v in terms)
    if not terms or len(rebuilt.replace(" ", "")) != len(re.sub(r'[\s()"]|AND', "", text)):
        raise ApiError(
            400, f"Invalid list filter expression '{text}' (cloudsim knows FIELD = \"VALUE\" terms)"
        )
    for field_name, op, value in terms:
        if field_name.startswith("labels."):
            have = (inst.get("labels") or {}).get(field_name[7:])
        else:
            have = inst.get(field_name)
        same = have is not None and str(have) == value
        if (op in ("=", "eq")) != same:
            return False
    return True


class GcpSim(Sim):
    """The Compute endpoint, the metadata servers and the players of one project of instances."""

    cloud = "gcp"

    def __init__(
        self,
        port: int,
        storage: str,
        work_dir: str,
        runner: str = "process",
        image: str = "",
        interval: float = 0.5,
    ):
        super().__init__(work_dir, runner, image, interval)
        self.port, self.storage = port, storage.rstrip("/")
        self.lock = threading.RLock()
        #: (project, zone, name) -> the instance resource as stored
        self.instances: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
        self.operations: Dict[str, Dict[str, Any]] = {}
        self.shutdowns: Dict[str, subprocess.Popen] = {}
        self.requests: List[Dict[str, Any]] = []
        self.failures: List[Dict[str, Any]] = []
        self.token = "planted-gce-" + secrets.token_urlsafe(32)
        self.next_id = int(time.time() * 1000) % 10**12
        self.base = f"http://127.0.0.1:{port}/compute/v1"
        self.instance_storage = self.storage

    # -- the Compute API ---------------------------------------------------------------
    def _operation(
        self, project: str, zone: str, kind: str, target: str, error: Optional[Dict[str, Any]] = None
    ) -> Dict[str, Any]:
        self.next_id += 1
        name = f"operation-{self.next_id}-{secrets.token_hex(4)}"
        op = {
            "kind": "compute#operation",
            "id": str(self.next_id),
            "name": name,
            "zone": f"{self.base}/projects/{project}/zones/{zone}",
            "operationType": kind,
            "targetLink": f"{self.base}/projects/{project}/zones/{zone}/instances/{target}",
            "status": "DONE",
            "progress": 100,
            "insertTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "selfLink": f"{self.base}/projects/{project}/zones/{zone}/operations/{name}",
        }
        if error:
            op["error"] = {"errors": [error]}
            op["httpErrorStatusCode"] = 503
        self.operations[name] = op
        return op

    def _zone(self, zone: str) -> None:
        if zone not in ZONES:
            raise ApiError(404, f"The resource 'projects/p/zones/{zone}' was not found", "notFound")

    def _resource(self, project: str, zone: str, inst: Dict[str, Any]) -> Dict[str, Any]:
        return {**inst, "zone": f"{self.base}/projects/{project}/zones/{zone}"}

    def compute(self, method: str, path: str, body: bytes) -> Tuple[int, Dict[str, Any]]:
        parts = urllib.parse.urlsplit(path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        segs = parts.path.strip("/").split("/")
        if segs[:2] != ["compute", "v1"] or len(segs) < 4 or segs[2] != "projects":
            raise ApiError(404, f"unknown path {parts.path}", "notFound")
        project, rest = segs[3], segs[4:]
        doc: Dict[str, Any] = {}
        if body:
            try:
                doc = json.loads(body)
            except ValueError:
                raise ApiError(400, "Invalid JSON payload received.") from None
        with self.lock:
            self.requests.append({"method": method, "path": parts.path, "query": query, "body": doc})
            if rest == ["zones"] and method == "GET":
                return 200, {
                    "kind": "compute#zoneList",
                    "items": [{"kind": "compute#zone", "name": z, "status": "UP"} for z in ZONES],
                }
            if len(rest) == 2 and rest[0] == "zones" and method == "GET":
                self._zone(rest[1])
                return 200, {
                    "kind": "compute#zone",
                    "name": rest[1],
                    "status": "UP",
                    "region": rest[1].rsplit("-", 1)[0],
                }
            if len(rest) == 3 and rest[:2] == ["global", "images"] and method == "GET":
                if rest[2] not in IMAGES.get(project, {}):
                    raise ApiError(
                        404,
                        f"The resource 'projects/{project}/global/images/{rest[2]}' was not found",
                        "notFound",
                    )
                return 200, {
                    "kind": "compute#image",
                    "name": rest[2],
                    "family": IMAGES[project][rest[2]],
                    "status": "READY",
                }
            if (
                len(rest) == 5
                and rest[:3] == ["global", "images", "family"]
                or (len(rest) == 4 and rest[:3] == ["global", "images", "family"])
            ):
                family = rest[3]
                for name, fam in IMAGES.get(project, {}).items():
                    if fam == family:
                        return 200, {"kind": "compute#image", "name": name, "family": fam, "status": "READY"}
                raise ApiError(
                    404,
                    f"The resource 'projects/{project}/global/images/family/{family}' was not found",
                    "notFound",
                )
            if len(rest) < 3 or rest[0] != "zones":
                raise ApiError(404, f"unknown path {parts.path}", "notFound")
            zone, kind, tail = rest[1], rest[2], rest[3:]
            self._zone(zone)
            if kind == "machineTypes" and len(tail) == 1 and method == "GET":
                if tail[0] not in MACHINE_TYPES:
                    raise ApiError(
                        404,
                        f"The resource 'projects/{project}/zones/{zone}/machineTypes/{tail[0]}' was not found",
                        "notFound",
                    )
                return 200, {
                    "kind": "compute#machineType",
                    "name": tail[0],
                    "guestCpus": MACHINE_TYPES[tail[0]],
                    "zone": zone,
                }
            if kind == "acceleratorTypes" and len(tail) == 1 and method == "GET":
                if tail[0] not in ACCELERATORS:
                    raise ApiError(
                        404,
                        f"The resource 'projects/{project}/zones/{zone}/acceleratorTypes/{tail[0]}' was not found",
                        "notFound",
                    )
                return 200, {"kind": "compute#acceleratorType", "name": tail[0], "zone": zone}
            if kind == "operations" and tail and method in ("GET", "POST"):
                op = self.operations.get(tail[0])
                if op is None:
                    raise ApiError(
                        404,
                        f"The resource 'projects/{project}/zones/{zone}/operations/{tail[0]}' was not found",
                        "notFound",
                    )
                return 200, op
            if kind != "instances":
                raise ApiError(404, f"unknown path {parts.path}", "notFound")
            if not tail and method == "POST":
                return 200, self._insert(project, zone, doc)
            if not tail and method == "GET":
                items = [
                    self._resource(p, z, inst)
                    for (p, z, _n), inst in sorted(self.instances.items())
                    if p == project and z == zone and match_filter(inst, query.get("filter", ""))
                ]
                return 200, {
                    "kind": "compute#instanceList",
                    "items": items,
                    "id": f"projects/{project}/zones/{zone}/instances",
                }
            if len(tail) == 1:
                key = (project, zone, tail[0])
                inst = self.instances.get(key)
                if inst is None:
                    raise ApiError(
                        404,
                        f"The resource 'projects/{project}/zones/{zone}/instances/{tail[0]}' was not found",
                        "notFound",
                    )
                if method == "GET":
                    return 200, self._resource(project, zone, inst)
                if method == "DELETE":
                    inst["status"] = "STOPPING"
                    inst["_delete"] = True
                    return 200, self._operation(project, zone, "delete", tail[0])
        raise ApiError(404, f"unknown path {parts.path}", "notFound")

    def _insert(self, project: str, zone: str, doc: Dict[str, Any]) -> Dict[str, Any]:
        check_instance(doc, project, zone)
        key = (project, zone, doc["name"])
        if key in self.instances:
            raise ApiError(
                409,
                f"The resource 'projects/{project}/zones/{zone}/instances/{doc['name']}' already exists",
                "alreadyExists",
            )
        for fault in list(self.failures):
            if fault["after"] > 0:
                fault["after"] -= 1
                continue
            self.failures.remove(fault)
            if fault["http"]:
                raise ApiError(fault["http"], f"Quota exceeded: {fault['reason']}", fault["reason"])
            return self._operation(
                project,
                zone,
                "insert",
                doc["name"],
                {
                    "code": fault["reason"],
                    "message": f"The zone 'projects/{project}/zones/{zone}' does not have enough resources available to fulfill the request.",
                },
            )
        self.next_id += 1
        self.instances[key] = {
            **doc,
            "kind": "compute#instance",
            "id": str(self.next_id),
            "status": "PROVISIONING",
            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "selfLink": f"{self.base}/projects/{project}/zones/{zone}/instances/{doc['name']}",
        }
        return self._operation(project, zone, "insert", doc["name"])

    # -- the metadata server of one instance ------------------------------------------
    def _metadata(self, key: Tuple[str, str, str]):
        project, zone, name = key

        def handler(method: str, path: str, headers: Dict[str, str]):
            path = urllib.parse.urlsplit(path).path
            if headers.get("metadata-flavor") != "Google":
                return text_answer("Missing Metadata-Flavor:Google header.", 403)
            inst = self.instances.get(key) or {}
            prefix = "/computeMetadata/v1/"
            if not path.startswith(prefix):
                return text_answer("not found", 404)
            what = path[len(prefix) :]
            attrs = {i["key"]: i.get("value", "") for i in (inst.get("metadata") or {}).get("items") or []}
            if what == "instance/name":
                return text_answer(name)
            if what == "instance/id":
                return text_answer(str(inst.get("id", "")))
            if what == "instance/zone":
                return text_answer(f"projects/{project}/zones/{zone}")
            if what == "project/project-id":
                return text_answer(project)
            if what == "instance/preempted":
                return text_answer("TRUE" if inst.get("_preempted") else "FALSE")
            if what.startswith("instance/attributes/"):
                attr = what[len("instance/attributes/") :]
                if attr == "":
                    return text_answer("\n".join(attrs))
                return text_answer(attrs[attr]) if attr in attrs else text_answer("not found", 404)
            if what == "instance/service-accounts/default/token" and inst.get("serviceAccounts"):
                return json_answer({"access_token": self.token, "expires_in": 3599, "token_type": "Bearer"})
            return text_answer("not found", 404)

        return handler

    # -- playing ----------------------------------------------------------------------
    def _start(self, key: Tuple[str, str, str], inst: Dict[str, Any]) -> None:
        ident = f"{key[2]}-{inst['id']}"
        inst["_ident"] = ident
        attrs = {i["key"]: i.get("value", "") for i in (inst.get("metadata") or {}).get("items") or []}
        script = attrs.get("startup-script") or "#!/bin/bash\ntrue\n"
        env = {"STORAGE_EMULATOR_HOST": self.instance_storage}
        meta = self.play(ident, script, env, self._metadata(key))
        inst["status"] = "RUNNING"
        print(f"cloudsim gcp: playing {key[2]} ({key[1]}, metadata {meta.url})", flush=True)

    def preempt(self, name: str, window: float) -> Dict[str, Any]:
        with self.lock:
            key, inst = self._find(name)
            inst["_preempted"] = True
            inst["_gone_at"] = time.time() + window
            inst["status"] = "STOPPING"  # as GCE: stopping from the preemption on, for the window
            player = self.players.get(inst.get("_ident", ""))
            attrs = {i["key"]: i.get("value", "") for i in (inst.get("metadata") or {}).get("items") or []}
            if player is not None and attrs.get("shutdown-script"):
                env = {
                    "STORAGE_EMULATOR_HOST": self.instance_storage,
                    "EASYLAUNCH_METADATA_URL": self.meta[inst["_ident"]].url,
                }
                self.shutdowns[inst["_ident"]] = player.run_script("shutdown", attrs["shutdown-script"], env)
        print(f"cloudsim gcp: preempted {name} (gone in {window:g} s)", flush=True)
        return {"name": name, "gone_at": inst["_gone_at"]}

    def _find(self, name: str) -> Tuple[Tuple[str, str, str], Dict[str, Any]]:
        for key, inst in self.instances.items():
            if key[2] == name:
                return key, inst
        raise KeyError(name)

    def _end(self, key: Tuple[str, str, str], why: str) -> None:
        inst = self.instances.get(key)
        if inst is None:
            return
        ident = inst.get("_ident", "")
        if ident in self.players:
            self.players[ident].kill()
        proc = self.shutdowns.pop(ident, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
        sched = inst.get("scheduling") or {}
        if (
            inst.get("_delete")
            or sched.get("instanceTerminationAction", "STOP") == "DELETE"
            or not inst.get("_preempted")
        ):
            del self.instances[key]
        else:
            inst["status"] = "TERMINATED"
        print(f"cloudsim gcp: {key[2]} {why}", flush=True)

    def kill(self, name: str) -> Dict[str, Any]:
        with self.lock:
            key, inst = self._find(name)
            inst["_delete"] = True
            self._end(key, "killed without notice")
        return {"name": name, "killed": True}

    def step(self) -> None:
        with self.lock:
            for key, inst in list(self.instances.items()):
                if inst["status"] == "PROVISIONING":
                    self._start(key, inst)
                elif inst.get("_delete"):
                    self._end(key, "deleted")
                elif inst.get("_gone_at") and time.time() >= inst["_gone_at"]:
                    self._end(key, "reclaimed at the end of its preemption window")

    def describe(self) -> Dict[str, Any]:
        out = []
        with self.lock:
            for ident, player in self.players.items():
                inst = next((i for i in self.instances.values() if i.get("_ident") == ident), None)
                out.append(
                    {
                        **player.describe(),
                        "name": ident.rsplit("-", 1)[0],
                        "metadata": self.meta[ident].url,
                        "status": inst["status"] if inst else "gone",
                        "preempted": bool(inst and inst.get("_preempted")),
                    }
                )
        return {"instances": out}

    def planted(self) -> Dict[str, str]:
        return {"token": self.token}

    def command(self, method: str, path: str, query: Dict[str, str]) -> Optional[Answer]:
        if path == "/requests":
            with self.lock:
                return json_answer(self.requests)
        if method == "POST" and path == "/preempt":
            return json_answer(self.preempt(query["name"], float(query.get("window", 30))))
        if method == "POST" and path == "/kill":
            return json_answer(self.kill(query["name"]))
        if method == "POST" and path == "/fail":
            with self.lock:
                self.failures.append(
                    {
                        "reason": query.get("reason", "ZONE_RESOURCE_POOL_EXHAUSTED"),
                        "after": int(query.get("after", 0)),
                        "http": int(query.get("http", 0)),
                    }
                )
            return json_answer({"armed": len(self.failures)})
        return None

    def _compute_answer(self, method: str, path: str, headers: Dict[str, str], body: bytes) -> Answer:
        """A Compute API request; errors in Google's format (a cloudsim bug: a 500 the client sees)."""
        try:
            status, doc = self.compute(method, path, body)
        except ApiError as err:
            status, doc = err.code, err.body()
        except Exception as exc:
            status, doc = 500, ApiError(500, f"cloudsim: {type(exc).__name__}: {exc}", "backendError").body()
        return status, json.dumps(doc).encode(), "application/json; charset=UTF-8"

    def _storage_answer(self, method: str, path: str, headers: Dict[str, str], body: bytes) -> Answer:
        """A pass-through to the GCS emulator for the instances: gcp-storage-emulator drops the
        connection on an empty ``uploadType=media`` upload (real GCS stores an empty object), so
        such an upload is sent on as the equivalent ``multipart`` one."""
        headers = {k: v for k, v in headers.items() if k not in ("host", "content-length")}
        parts = urllib.parse.urlsplit(path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        if method == "POST" and query.get("uploadType") == "media" and not body:
            boundary = "cloudsim-" + secrets.token_hex(8)
            meta = json.dumps({"name": query.get("name", "")})
            body = (
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n"
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n\r\n--{boundary}--\r\n"
            ).encode()
            headers["content-type"] = f"multipart/related; boundary={boundary}"
            path = parts.path + "?" + urllib.parse.urlencode({"uploadType": "multipart"})
        req = urllib.request.Request(
            self.storage + path, data=body if body else None, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                status, data, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            status, data, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
        except OSError as exc:
            status, data, ctype = 503, str(exc).encode(), "text/plain"
        return status, data, ctype or "application/octet-stream"

    def serve(self) -> List[HttpServer]:
        """The Compute endpoint on ``port``, and the instances' way to the GCS emulator."""
        compute = HttpServer(self._compute_answer, self.port, "cloudsim-compute")
        storage = HttpServer(self._storage_answer, 0, "cloudsim-storage")
        self.instance_storage = storage.url
        return [compute, storage]

    def banner(self) -> str:
        return (
            f"Compute endpoint http://127.0.0.1:{self.port} (GCP_COMPUTE_ENDPOINT), "
            f"storage {self.storage}, runner {self.runner}"
        )

    def shutdown(self) -> None:
        for proc in self.shutdowns.values():
            if proc.poll() is None:
                proc.kill()
        super().shutdown()
