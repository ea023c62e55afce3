"""cloudsim: play cloud instances on this machine, against local emulators (no cloud account).

``python -m easylaunch.cloudsim aws --endpoint URL`` plays the EC2 instances created in a moto
server; ``python -m easylaunch.cloudsim gcp --port PORT --storage URL`` serves a Compute v1
endpoint of its own (it validates request bodies against the real API's field names) and plays
the instances created there, against a GCS emulator. Each instance's boot script (user data /
startup-script) runs for real, with a metadata server of its own on 127.0.0.1, and a spot
interruption / preemption can be delivered to it. Not imported by ``import easylaunch``.
"""
