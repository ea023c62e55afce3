"""Hydra launcher plugin: ``python my_app.py -m hydra/launcher=easylaunch hydra.launcher.mode=slurm``.

Every job of a Hydra multirun batch becomes one run of ONE easylaunch sweep (one Slurm array,
one local pool, ...); see :mod:`.launcher`. Installed with ``pip install easylaunch[hydra]``.
"""
