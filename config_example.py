"""easylaunch configuration (doodad easy_launch keys).

Found at $EASYLAUNCH_CONFIG, ./easylaunch_config.py or ~/.config/easylaunch/config.py.
Only UPPERCASE names are read; an unknown name is an error. Call options override these.
Local modes need none of it. Written by `easylaunch init`.
"""

# code directories recorded (git) and shipped; default: the launch script's repository
CODE_DIRS_TO_MOUNT = None

# code snapshot: more untracked files to leave out (globs; 'data/*' or a name like '*.bin')
SNAPSHOT_EXCLUDE = []

# code snapshot: files to ship although a default rule leaves them out (globs)
SNAPSHOT_INCLUDE = []

# data dirs for containers: dicts of local_dir, mount_point and read_only (default True)
NON_CODE_DIRS_TO_MOUNT = []

# where run directories go (else $EASYLAUNCH_LOG_DIR, else ./easylaunch-logs)
LOCAL_LOG_DIR = None

# output dir inside containers/VMs
OUTPUT_DIR_FOR_DOODAD_TARGET = '/tmp/doodad-output/'

# local modes and local_docker: runs at once (default: CPU count)
MAX_PARALLEL = None

# seconds a run gets to stop after a cancel or its timeout before it is killed (SIGKILL)
CANCEL_GRACE = 10

# local_docker: daemon URL (default: $DOCKER_HOST, else the local socket)
DOCKER_HOST = None

# ec2: s3://BUCKET/PREFIX where code, payloads and every run's outputs go
AWS_S3_PATH = None

# Docker image for CPU runs (ec2/gcp: runs in it on the instance; '' or None: the VM's python3)
DOODAD_DOCKER_IMAGE = None

# Docker image for GPU runs
GPU_DOODAD_DOCKER_IMAGE = None

# EC2 instance type for CPU runs
INSTANCE_TYPE = 'c4.2xlarge'

# EC2 instance type for GPU runs
GPU_INSTANCE_TYPE = 'g3.4xlarge'

# EC2 spot bid for CPU runs (USD/hour)
SPOT_PRICE = 0.3

# EC2 spot bid for GPU runs (USD/hour)
GPU_SPOT_PRICE = 0.5

# ec2: region -> AMI id (an image with python3, and Docker when a docker_image is used)
REGION_TO_GPU_AWS_IMAGE_ID = {}

# doodad only; ignored: ec2/gcp sync everything a run writes (doodad's list lost files)
AWS_FILE_TYPES_TO_SAVE = ('*.txt', '*.csv', '*.json', '*.gz', '*.tar', '*.log', '*.pkl', '*.mp4', '*.png', '*.jpg', '*.jpeg', '*.patch', '*.html')

# ec2: AMI for CPU runs (default: REGION_TO_GPU_AWS_IMAGE_ID[region])
AWS_IMAGE_ID = None

# ec2: IAM instance profile the instances get (their only credentials: S3 access)
AWS_IAM_INSTANCE_PROFILE_NAME = None

# ec2: security group names
AWS_SECURITY_GROUPS = []

# ec2: security group ids
AWS_SECURITY_GROUP_IDS = []

# ec2: key pair name for SSH into the instances (optional)
AWS_KEY_NAME = None

# ec2: default region
AWS_REGION = 'us-east-1'

# ec2/gcp: a launch that would start more instances than this is refused (money guard)
MAX_INSTANCES = 10

# mode ssh: name -> dict(hostname, username, port=22, key_file, known_hosts='~/.ssh/known_hosts', python='python3', log_dir, trust_on_first_use=False, proxy_jump, max_parallel, docker_host, docker_root); a Host of ~/.ssh/config works as a name too
SSH_HOSTS = {}

# mode ssh: the host used when ssh_host is not given
SSH_DEFAULT_HOST = None

# mode ssh: key file of SSH_HOSTS entries without key_file (when it exists)
SSH_PRIVATE_KEY = '~/.ssh/id_rsa'

# mode ssh: log dir on the hosts (an entry's log_dir wins)
SSH_LOG_DIR = '~/easylaunch-logs'

# doodad only; ignored (runs live in the remote log dir)
SSH_TMP_DIR = '~/.cache/easylaunch'

# image for local_singularity / slurm_singularity
SINGULARITY_IMAGE = None

# shell lines run before the runner in singularity modes
SINGULARITY_PRE_CMDS = []

# name -> SlurmConfig fields (account_name, partition, time_in_mins, ...)
SLURM_CONFIGS = {}

# extra `singularity exec` arguments
BRC_EXTRA_SINGULARITY_ARGS = ''

# htp: where the taskfile is copied to on the cluster
TASKFILE_PATH_ON_BRC = None

# sss/htp: where scripts are copied to on the cluster
SLURM_DIRECTORY_FOR_JOB_SCRIPT = None

# sss/htp: code dirs as seen on the cluster
SSS_CODE_DIRS_TO_MOUNT = []

# sss/htp: data dirs as seen on the cluster
SSS_NON_CODE_DIRS_TO_MOUNT = []

# sss/htp: log dir on the cluster
SSS_LOG_DIR = None

# sss/htp: singularity image for GPU runs
SSS_GPU_IMAGE = None

# sss/htp: singularity image for CPU runs
SSS_CPU_IMAGE = None

# doodad only; ignored (easylaunch ships its runner)
SSS_RUN_DOODAD_EXPERIMENT_SCRIPT_PATH = None

# sss/htp: shell lines run before the runner
SSS_PRE_CMDS = []

# GCE image for CPU runs ('family/NAME' for an image family)
GCP_IMAGE_NAME = None

# GCE image for GPU runs
GCP_GPU_IMAGE_NAME = None

# gcp: project of GCP_IMAGE_NAME (e.g. 'debian-cloud'; GCP_DEFAULT_KWARGS image_project wins)
GCP_IMAGE_PROJECT = None

# GCS bucket for code, payloads and outputs ('BUCKET' or 'gs://BUCKET/PREFIX')
GCP_BUCKET_NAME = None

# project, zone, instance_type, image_name, image_project, terminate, preemptible, provisioning_model, gpu_kwargs (gpu_model, num_gpu), disk_size_gb, service_account, network
GCP_DEFAULT_KWARGS = {}

# gcp: the instances' service account (their only credentials: bucket + self-delete scopes)
GCP_SERVICE_ACCOUNT = 'default'

# doodad only; ignored: ec2/gcp sync everything a run writes (doodad's list lost files)
GCP_FILE_TYPES_TO_SAVE = ('*.txt', '*.csv', '*.json', '*.gz', '*.tar', '*.log', '*.pkl', '*.mp4', '*.png', '*.jpg', '*.jpeg', '*.patch', '*.html')

# gcp: Compute API root (default: $EASYLAUNCH_GCP_COMPUTE_ENDPOINT, else Google's)
GCP_COMPUTE_ENDPOINT = None
