"""Makes docs/resources.png, the README's figure: a small GPU-packed sweep, plotted by
``easylaunch plot``. Runs on any machine (two injected 1000 MiB GPUs, see easylaunch.gpu_fake).

    python docs/make_plot.py            # writes docs/resources.png
"""

import os
import subprocess
import tempfile
import time
from pathlib import Path

from easylaunch import gpu_fake, run_sweep

MIB = 1024 * 1024


def train(doodad_config, variant):
    """Grows its memory over two seconds, spins the CPU, holds fake GPU memory."""
    gpu_fake.use(variant["gpu_mib"] * MIB)
    blocks = []
    end = time.time() + variant["secs"]
    while time.time() < end:
        blocks.append(bytearray(8 * MIB))
        sum(range(200_000))
        time.sleep(0.05)
    return len(blocks)


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "resources.png"
    logs = Path(tempfile.mkdtemp(prefix="easylaunch-docs-"))
    os.environ["EASYLAUNCH_FAKE_GPUS"] = "1000,1000"
    os.environ["EASYLAUNCH_FAKE_GPU_USAGE"] = str(logs / "gpu-usage")
    variants = [{"gpu_mib": 300, "secs": 2.0, "i": i} for i in range(4)]
    sweep = run_sweep(
        train,
        variants,
        exp_name="packed",
        mode="local_pool",
        base_log_dir=str(logs),
        gpus="auto",
        monitor=0.1,
    )
    for job in sweep:
        g = job.status["gpu"]
        print(
            job.run_dir.name,
            "GPU",
            g["id"],
            "profiling" if g["profiling"] else "packed",
            g["reserved_bytes"] // MIB,
            "MiB",
        )
    cmd = [
        "easylaunch",
        "--log-dir",
        str(logs),
        "plot",
        "packed",
        "-o",
        str(out),
        "--title",
        "easylaunch plot packed: 4 runs of a GPU sweep",
    ]
    subprocess.run(cmd, check=True)
    print("wrote", out)
