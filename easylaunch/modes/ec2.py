"""``ec2``: a sweep packed on EC2 instances (spot by default), outputs in S3.

::

    # config file
    AWS_S3_PATH = "s3://my-bucket/easylaunch"
    REGION_TO_GPU_AWS_IMAGE_ID = {"us-east-1": "ami-0123456789abcdef0"}   # or AWS_IMAGE_ID
    AWS_IAM_INSTANCE_PROFILE_NAME = "easylaunch-s3"     # the instances' only credentials
    MAX_INSTANCES = 10

    sweep = run_sweep(train, variants, exp_name="demo", mode="ec2", region="us-east-1",
                      instance_type="c5.large", spot_price=0.1, num_exps_per_instance=10)

boto3 (``pip install 'easylaunch[aws]'``) is imported only when this mode is used. Credentials
come from boto3's standard places; ``$AWS_ENDPOINT_URL`` points it at an emulator (moto), as
for any boto3 program. Instances are spot (``InstanceMarketOptions``, max price ``spot_price``,
else config ``SPOT_PRICE``/``GPU_SPOT_PRICE``) unless ``spot_price=0`` (on-demand); IMDSv2 is
required; every instance and volume is tagged with the experiment, the batch and its runs.
See :mod:`easylaunch.modes.cloud` for what happens then.
"""

from __future__ import annotations

import difflib
import os
import shlex
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..options import Option
from .cloud import CloudError, CloudMode, Provider


def credential_places() -> str:
    """Where boto3 looked for credentials, each with what is there (for the "no credentials"
    message): variables set or not, the files it read and whether they exist. Never a value."""

    def var(name: str) -> str:
        return f"${name} ({'set' if os.environ.get(name) else 'not set'})"

    def path(env: str, default: str) -> str:
        where = os.path.expanduser(os.environ.get(env) or default)
        return f"{where} ({'exists' if os.path.exists(where) else 'no such file'}; ${env} moves it)"

    return "; ".join(
        [
            f"{var('AWS_ACCESS_KEY_ID')} + {var('AWS_SECRET_ACCESS_KEY')}",
            var("AWS_PROFILE"),
            path("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
            path("AWS_CONFIG_FILE", "~/.aws/config"),
            "SSO / web identity ($AWS_WEB_IDENTITY_TOKEN_FILE), the container or instance metadata "
            "credentials (none answered)",
        ]
    )


CAPACITY_ERRORS = (
    "InsufficientInstanceCapacity",
    "InstanceLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    "VcpuLimitExceeded",
    "Unsupported",
)


def _boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise ImportError("mode 'ec2' needs boto3: pip install 'easylaunch[aws]'") from None
    return boto3


def _code(exc: Exception) -> str:
    return (
        str(getattr(exc, "response", {}).get("Error", {}).get("Code", "")) if hasattr(exc, "response") else ""
    )


class Ec2Provider(Provider):
    name = "aws"
    scheme = "s3"
    metadata_url = "http://169.254.169.254"
    metadata_limit = 16 * 1024
    bucket_key = "AWS_S3_PATH"

    def __init__(self, settings: Any, options: Dict[str, Any]):
        super().__init__(settings, options)
        self.region = options.get("region") or settings.get("AWS_REGION") or "us-east-1"
        self._clients: Dict[str, Any] = {}

    def client(self, service: str) -> Any:
        if service not in self._clients:
            boto3 = _boto3()
            from botocore.config import Config

            session = boto3.session.Session(region_name=self.region)
            self._clients[service] = session.client(
                service, config=Config(retries={"max_attempts": 8, "mode": "standard"})
            )
        return self._clients[service]

    # -- bucket ----------------------------------------------------------------------
    def bucket(self) -> Tuple[str, str]:
        path = self.settings.get("AWS_S3_PATH")
        if not path:
            raise ValueError(
                "mode 'ec2' needs a bucket: set AWS_S3_PATH = 's3://BUCKET/PREFIX' in the config file"
            )
        if not str(path).startswith("s3://"):
            raise ValueError(f"config AWS_S3_PATH = {path!r} must look like 's3://BUCKET/PREFIX'")
        bucket, _, prefix = str(path)[5:].partition("/")
        extra = (self.options.get("s3_log_prefix") or "").strip("/")
        prefix = "/".join(p for p in (prefix.strip("/"), extra) if p)
        return bucket, prefix

    def head(self, key: str) -> Optional[int]:
        s3 = self.client("s3")
        self.count("head")
        try:
            return int(s3.head_object(Bucket=self.bucket()[0], Key=key)["ContentLength"])
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def put(self, key: str, data: bytes) -> None:
        import base64
        import hashlib

        md5 = hashlib.md5(data)
        self.count("put")
        answer = self.client("s3").put_object(
            Bucket=self.bucket()[0], Key=key, Body=data, ContentMD5=base64.b64encode(md5.digest()).decode()
        )
        etag = str(answer.get("ETag", "")).strip('"')
        if etag and etag != md5.hexdigest():
            raise CloudError(f"S3 stored {key} with checksum {etag}, not {md5.hexdigest()}")

    def get(self, key: str) -> bytes:
        self.count("get")
        return self.client("s3").get_object(Bucket=self.bucket()[0], Key=key)["Body"].read()

    def list(self, prefix: str) -> Dict[str, Tuple[int, str]]:
        out: Dict[str, Tuple[int, str]] = {}
        self.count("list")
        paginator = self.client("s3").get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket()[0], Prefix=prefix):
            for item in page.get("Contents") or []:
                out[item["Key"]] = (int(item["Size"]), str(item.get("ETag", "")).strip('"'))
        return out

    def delete(self, key: str) -> None:
        self.count("delete")
        self.client("s3").delete_object(Bucket=self.bucket()[0], Key=key)

    def check_bucket(self) -> None:
        bucket, prefix = self.bucket()
        s3 = self.client("s3")
        try:
            s3.head_bucket(Bucket=bucket)
        except Exception as exc:
            code = _code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise CloudError(
                    f"mode 'ec2': the bucket {bucket!r} of AWS_S3_PATH does not exist (region {self.region}). "
                    "Create it (aws s3 mb s3://BUCKET) or set AWS_S3_PATH to one that exists"
                ) from None
            raise CloudError(
                f"mode 'ec2': the bucket {bucket!r} of AWS_S3_PATH cannot be reached: {exc}"
            ) from None
        probe = f"{prefix}/.easylaunch-write-probe-{os.getpid()}".lstrip("/")
        try:
            s3.put_object(Bucket=bucket, Key=probe, Body=b"")
            s3.delete_object(Bucket=bucket, Key=probe)
        except Exception as exc:
            raise PermissionError(
                f"mode 'ec2': the bucket {bucket!r} of AWS_S3_PATH is not writable with these credentials "
                f"({_code(exc) or exc}). Grant s3:PutObject on it, or set AWS_S3_PATH to a writable bucket"
            ) from None

    # -- compute ---------------------------------------------------------------------
    def resolve(self, batch: Any, n_instances: int) -> Dict[str, Any]:
        boto3 = _boto3()
        opts, settings = self.options, self.settings
        regions = boto3.session.Session().get_available_regions("ec2")
        if regions and self.region not in regions:
            close = difflib.get_close_matches(self.region, regions, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"mode 'ec2': unknown region {self.region!r}.{hint} Known regions: {', '.join(regions)}"
            )
        if boto3.session.Session(region_name=self.region).get_credentials() is None:
            raise CloudError(
                f"mode 'ec2': no AWS credentials found. boto3 looked at: {credential_places()}. Set "
                "$AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY or $AWS_PROFILE, or run `aws configure`"
            )
        gpu = bool(opts.get("use_gpu"))
        ami = opts.get("image_id") or (settings.get("REGION_TO_GPU_AWS_IMAGE_ID") or {}).get(self.region)
        if not ami and not gpu:
            ami = settings.get("AWS_IMAGE_ID")
        if not ami:
            raise ValueError(
                f"mode 'ec2': no AMI for region {self.region!r}: pass image_id='ami-...' or set "
                f"REGION_TO_GPU_AWS_IMAGE_ID = {{{self.region!r}: 'ami-...'}} (or AWS_IMAGE_ID) in the config file"
            )
        ec2 = self.client("ec2")
        try:
            images = ec2.describe_images(ImageIds=[ami]).get("Images") or []
        except Exception as exc:
            if not _code(exc).startswith("InvalidAMIID"):
                raise CloudError(f"mode 'ec2': describing AMI {ami!r} failed: {exc}") from None
            images = []
        if not images:
            raise ValueError(
                f"mode 'ec2': AMI {ami!r} not found in region {self.region!r}. Check image_id / "
                "REGION_TO_GPU_AWS_IMAGE_ID (AMIs are per region)"
            )
        itype = opts.get("instance_type") or settings.get("GPU_INSTANCE_TYPE" if gpu else "INSTANCE_TYPE")
        try:
            ec2.describe_instance_types(InstanceTypes=[itype])
        except Exception as exc:
            if _code(exc).startswith("InvalidInstanceType") or "instance type" in str(exc).lower():
                raise ValueError(
                    f"mode 'ec2': unknown instance type {itype!r} in region {self.region!r} "
                    "(instance_type= or config INSTANCE_TYPE / GPU_INSTANCE_TYPE)"
                ) from None
            raise CloudError(f"mode 'ec2': checking instance type {itype!r} failed: {exc}") from None
        price = opts.get("spot_price")
        if price is None:
            price = settings.get("GPU_SPOT_PRICE" if gpu else "SPOT_PRICE")
        profile = settings.get("AWS_IAM_INSTANCE_PROFILE_NAME")
        if not profile:
            raise ValueError(
                "mode 'ec2': set AWS_IAM_INSTANCE_PROFILE_NAME in the config file: the instances write "
                "the bucket with that profile's credentials (easylaunch never puts keys in user data)"
            )
        try:
            self.client("iam").get_instance_profile(InstanceProfileName=profile)
        except Exception as exc:
            if _code(exc) == "NoSuchEntity":
                raise ValueError(
                    f"mode 'ec2': IAM instance profile {profile!r} (AWS_IAM_INSTANCE_PROFILE_NAME) does not exist"
                ) from None
            # no iam:GetInstanceProfile permission: run_instances will say
        self.bucket()
        return {
            "region": self.region,
            "image_id": ami,
            "instance_type": itype,
            "spot_price": float(price) if price else None,
            "instance_profile": profile,
            "security_groups": list(settings.get("AWS_SECURITY_GROUPS") or []),
            "security_group_ids": list(settings.get("AWS_SECURITY_GROUP_IDS") or []),
            "key_name": settings.get("AWS_KEY_NAME"),
            "notice_wait": 90,
            "notice_window": 120,  # a spot interruption notice: 2 minutes
        }

    def create(self, name: str, script: str, tags: Dict[str, str], resolved: Dict[str, Any]) -> str:
        tag_list = [{"Key": k, "Value": str(v)[:255]} for k, v in tags.items()]
        kwargs: Dict[str, Any] = dict(
            ImageId=resolved["image_id"],
            InstanceType=resolved["instance_type"],
            MinCount=1,
            MaxCount=1,
            UserData=script,
            IamInstanceProfile={"Name": resolved["instance_profile"]},
            InstanceInitiatedShutdownBehavior="terminate",
            MetadataOptions={
                "HttpTokens": "required",
                "HttpEndpoint": "enabled",
                "HttpPutResponseHopLimit": 2,
            },
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": tag_list},
                {"ResourceType": "volume", "Tags": tag_list},
            ],
        )
        if resolved.get("spot_price"):
            kwargs["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "MaxPrice": f"{resolved['spot_price']:.4f}",
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        if resolved.get("security_groups"):
            kwargs["SecurityGroups"] = resolved["security_groups"]
        if resolved.get("security_group_ids"):
            kwargs["SecurityGroupIds"] = resolved["security_group_ids"]
        if resolved.get("key_name"):
            kwargs["KeyName"] = resolved["key_name"]
        self.count("run_instances")
        try:
            answer = self.client("ec2").run_instances(**kwargs)
        except Exception as exc:
            code = _code(exc)
            if code in CAPACITY_ERRORS:
                raise CloudError(
                    f"mode 'ec2': EC2 refused the instance ({code}): {exc}. Try another instance_type, region "
                    "or spot_price (0 for on-demand), or ask AWS for a higher quota"
                ) from None
            raise CloudError(f"mode 'ec2': run_instances failed: {exc}") from None
        return str(answer["Instances"][0]["InstanceId"])

    def describe(self, ids: Sequence[str], resolved: Dict[str, Any]) -> Dict[str, str]:
        out = {i: "missing" for i in ids}
        self.count("describe")
        paginator = self.client("ec2").get_paginator("describe_instances")
        for page in paginator.paginate(Filters=[{"Name": "instance-id", "Values": list(ids)}]):
            for res in page.get("Reservations") or []:
                for inst in res.get("Instances") or []:
                    out[inst["InstanceId"]] = inst["State"]["Name"]
        return out

    def terminate(self, ids: Sequence[str], resolved: Dict[str, Any]) -> None:
        if ids:
            self.count("terminate")
            self.client("ec2").terminate_instances(InstanceIds=list(ids))

    def strays(self, exp: Optional[str], resolved: Dict[str, Any]) -> List[Dict[str, Any]]:
        filters = [
            {"Name": "tag:easylaunch", "Values": ["1"]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
        ]
        if exp:
            filters.append({"Name": "tag:easylaunch-exp", "Values": [exp]})
        out = []
        for page in self.client("ec2").get_paginator("describe_instances").paginate(Filters=filters):
            for res in page.get("Reservations") or []:
                for inst in res.get("Instances") or []:
                    tags = {t["Key"]: t["Value"] for t in inst.get("Tags") or []}
                    out.append(
                        {
                            "id": inst["InstanceId"],
                            "name": tags.get("Name", ""),
                            "state": inst["State"]["Name"],
                            "exp": tags.get("easylaunch-exp", ""),
                            "batch": tags.get("easylaunch-batch", ""),
                            "runs": tags.get("easylaunch-runs", ""),
                        }
                    )
        return out

    @classmethod
    def with_location(
        cls, options: Dict[str, Any], region: Optional[str] = None, zone: Optional[str] = None
    ) -> Dict[str, Any]:
        if zone:
            raise ValueError(
                f"--zone {zone!r} is an option of --mode gcp (a Compute Engine zone); EC2 instances are "
                "listed per region: pass --region REGION (default: config AWS_REGION)"
            )
        return {**options, "region": region} if region else dict(options)

    def location(self) -> str:
        return f"region {self.region}"

    def console_hint(self, ident: str, resolved: Dict[str, Any]) -> str:
        region = shlex.quote(resolved.get("region") or self.region)
        return f"`aws ec2 get-console-output --latest --region {region} --instance-id {shlex.quote(ident)}`"

    def describe_plan(self, resolved: Dict[str, Any], n: int) -> List[str]:
        lines = [
            f"  region {resolved['region']}, AMI {resolved['image_id']}, type {resolved['instance_type']}, "
            + (
                f"spot (max {resolved['spot_price']:.4f} USD/h)"
                if resolved.get("spot_price")
                else "on-demand"
            )
        ]
        try:
            history = self.client("ec2").describe_spot_price_history(
                InstanceTypes=[resolved["instance_type"]], ProductDescriptions=["Linux/UNIX"], MaxResults=20
            )["SpotPriceHistory"]
            if history:
                price = min(float(h["SpotPrice"]) for h in history)
                lines.append(
                    f"  spot price now {price:.4f} USD/h per instance: about {price * n:.4f} USD/h for {n} instance(s)"
                )
        except Exception as exc:
            lines.append(f"  (spot price history unavailable: {exc})")
        return lines


class Ec2Mode(CloudMode):
    """EC2 instances + S3 (see the module docstring)."""

    name = "ec2"
    provider_class = Ec2Provider
    options = (
        Option("region", (str,), None, "AWS region (default: config AWS_REGION, us-east-1)"),
        Option(
            "image_id", (str,), None, "AMI (default: config REGION_TO_GPU_AWS_IMAGE_ID[region], AWS_IMAGE_ID)"
        ),
        Option("s3_log_prefix", (str,), None, "extra prefix under AWS_S3_PATH for this launch's objects"),
        *CloudMode.common_options,
    )
