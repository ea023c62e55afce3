"""easylaunch configuration (doodad easy_launch keys).

Found at $EASYLAUNCH_CONFIG, ./easylaunch_config.py or ~/.config/easylaunch/config.py.
Only UPPERCASE names are read; an unknown name is an error. Call options override these.
Local modes need none of it. Written by `easylaunch init`.
"""

# code directories recorded (git) and shipped; default: the launch script's repository
CODE_DIRS_TO_MOUNT = None

# data dirs: dicts of local_dir and mount_point
NON_CODE_DIRS_TO_MOUNT = []

# where run directories go (else $EASYLAUNCH_LOG_DIR, else ./easylaunch-logs)
LOCAL_LOG_DIR = None

# output dir inside containers/VMs
OUTPUT_DIR_FOR_DOODAD_TARGET = '/tmp/doodad-output/'

# local/local_pool: runs at once (default: CPU count)
MAX_PARALLEL = None

# s3://bucket/prefix for EC2 outputs
AWS_S3_PATH = None

# Docker image for CPU runs
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

# region -> AMI id
REGION_TO_GPU_AWS_IMAGE_ID = {}

# glob patterns synced to S3
AWS_FILE_TYPES_TO_SAVE = ('*.txt', '*.csv', '*.json', '*.gz', '*.tar', '*.log', '*.pkl', '*.mp4', '*.png', '*.jpg', '*.jpeg', '*.patch', '*.html')

# name -> dict(username=..., hostname=..., port=22)
SSH_HOSTS = {}

# key of SSH_HOSTS used when ssh_host is not given
SSH_DEFAULT_HOST = None

# private key file for SSH
SSH_PRIVATE_KEY = '~/.ssh/id_rsa'

# log dir on SSH hosts
SSH_LOG_DIR = '~/easylaunch-logs'

# scratch dir on SSH hosts
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

# GCE image for CPU runs
GCP_IMAGE_NAME = None

# GCE image for GPU runs
GCP_GPU_IMAGE_NAME = None

# GCS bucket for outputs
GCP_BUCKET_NAME = None

# zone, instance_type, image_project, terminate, preemptible, gpu_kwargs
GCP_DEFAULT_KWARGS = {}

# glob patterns synced to GCS
GCP_FILE_TYPES_TO_SAVE = ('*.txt', '*.csv', '*.json', '*.gz', '*.tar', '*.log', '*.pkl', '*.mp4', '*.png', '*.jpg', '*.jpeg', '*.patch', '*.html')
