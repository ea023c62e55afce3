"""Quickstart: a 12-run hyperparameter sweep on this machine.

python examples/local_sweep.py            # runs, shows progress, prints a results table
easylaunch ls quickstart                  # the runs, from their directories
"""

import json
import math
import os

from easylaunch import grid, run_sweep


def train(doodad_config, variant):
    """A stand-in for training: writes a metrics file into its own run directory."""
    lr, depth = variant["lr"], variant["model"]["depth"]
    loss = (math.log10(lr) + 3) ** 2 + 0.1 * depth + 0.01 * variant["seed"]
    print(f"lr={lr} depth={depth} seed={variant['seed']} -> loss {loss:.3f}")
    with open(os.path.join(doodad_config.base_log_dir, "metrics.json"), "w") as f:
        json.dump({"loss": loss}, f)
    return loss


if __name__ == "__main__":
    variants = grid({"lr": [1e-2, 1e-3, 1e-4], "seed": range(2), "model.depth": [2, 4]})
    sweep = run_sweep(train, variants, exp_name="quickstart", mode="local", max_parallel=2)
    best = min(zip(sweep.results(), variants), key=lambda pair: pair[0])
    print(f"{len(sweep)} runs: {sweep.counts()}")
    print(f"best loss {best[0]:.3f} with {best[1]}")
    print(f"run directories: {sweep[0].run_dir.parent}")
