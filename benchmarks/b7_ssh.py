"""B7: an SSH host. The floor of one round trip and one upload, and a 100-variant sweep.

    source /tmp/easylaunch-services/sshd.env      # the chrooted sshd of scripts/services/sshd.sh
    .venv/bin/python benchmarks/b7_ssh.py [--quick] [--doodad-variants 100]

Side by side in one run, against the same sshd (a host that shares no filesystem with us):
- floor: one ``python3 -c pass`` round trip over a reused paramiko connection (median), and one
  SFTP upload of the code snapshot (median);
- B7a: 100 trivial variants with ``run_sweep(mode='ssh', expected_duration=0.01)`` until every
  result is read through the Job handles (so every result.pkl was fetched): SSH connections
  opened, snapshot uploads (1 on a fresh host; 0 on a second sweep of the same code), remote
  commands (exec requests) and requests per poll, total time; the same unpacked
  (``variants_per_task=1``);
- doodad's way, measured here: per variant one ``scp`` of its pickled payload and one ``ssh``
  that runs it and prints the result (the OpenSSH client, as doodad uses it), one variant after
  the other. Goal: B7a >= 20x faster.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Table, fmt_ms, machine, median, parse_args, temp_root  # noqa: E402

GOAL = 20.0
E = os.environ.get


def trivial(doodad_config, variant):
    return variant["i"]


def main() -> int:
    def extra(p):
        p.add_argument("--doodad-variants", type=int, default=100, help="variants run doodad's way")
        p.add_argument("-n", type=int, default=10, help="floor repetitions")

    args = parse_args(__doc__.splitlines()[0], extra)
    if not E("EASYLAUNCH_TEST_SSH"):
        print(
            "needs the test sshd: bash scripts/services/sshd.sh start && source /tmp/easylaunch-services/sshd.env"
        )
        return 2
    n = 3 if args.quick else args.n
    n_doodad = min(args.doodad_variants, 20) if args.quick else args.doodad_variants
    import cloudpickle
    import paramiko

    from easylaunch import run_sweep
    from easylaunch.snapshot import create

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    print(machine())
    host, port, user = (
        E("EASYLAUNCH_TEST_SSH_HOST"),
        int(E("EASYLAUNCH_TEST_SSH_PORT")),
        E("EASYLAUNCH_TEST_SSH_USER"),
    )
    key, known = E("EASYLAUNCH_TEST_SSH_KEY"), E("EASYLAUNCH_TEST_SSH_KNOWN_HOSTS")
    remote_root = f"{E('EASYLAUNCH_TEST_SSH_HOME')}/b7-{uuid.uuid4().hex[:8]}"
    client = paramiko.SSHClient()
    client.load_host_keys(known)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(host, port=port, username=user, key_filename=key, look_for_keys=False, allow_agent=False)

    def sh(command: str) -> str:
        _, out, err = client.exec_command(command)
        text = out.read().decode()
        if out.channel.recv_exit_status() != 0:
            raise RuntimeError(f"{command}: {err.read().decode()}")
        return text

    with temp_root("easylaunch-b7-", args.keep) as root:
        try:
            code = root / "code"
            code.mkdir()
            for i in range(20):
                (code / f"mod{i}.py").write_text("".join(f"x{j} = {j}\n" for j in range(50)))
            logs = root / "logs"
            config = root / "config.py"
            config.write_text(
                f"SSH_HOSTS = {{'bench': dict(hostname={host!r}, port={port}, username={user!r}, "
                f"key_file={key!r}, known_hosts={known!r}, log_dir={remote_root!r})}}\n"
            )
            os.environ["EASYLAUNCH_CONFIG"] = str(config)
            os.environ.pop("SSH_AUTH_SOCK", None)
            common = dict(ssh_host="bench", base_log_dir=str(logs), code_dirs_to_mount=[str(code)])

            # -- floors --------------------------------------------------------------------
            sh(f"mkdir -p {remote_root}")
            round_trips = []
            for _ in range(n + 1):
                t0 = time.perf_counter()
                sh("python3 -c pass")
                round_trips.append(time.perf_counter() - t0)
            round_trips = round_trips[1:]
            snap = create([str(code)], root / "store", include_easylaunch=False)
            data = Path(snap["archive"]).read_bytes()
            sftp = client.open_sftp()
            uploads = []
            for i in range(n):
                t0 = time.perf_counter()
                with sftp.open(f"{remote_root}/floor-{i}.tar.gz", "wb") as f:
                    f.set_pipelined(True)
                    f.write(data)
                uploads.append(time.perf_counter() - t0)
            table = Table(f"B7 floor (median of {n})")
            table.add("one `python3 -c pass` round trip, connection reused", fmt_ms(median(round_trips)))
            table.add(
                f"one SFTP upload of the snapshot ({len(data) / 1024:.0f} KiB)", fmt_ms(median(uploads))
            )
            table.print()

            # -- B7a: ours and doodad's way, interleaved (the load on a shared machine moves) ---
            variants = [{"i": i} for i in range(100)]
            zips_holder: list = []
            ssh_opts = ["-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                        "-o", "IdentitiesOnly=yes", "-i", key]  # fmt: skip
            runner = "import sys, cloudpickle; fn, v = cloudpickle.load(open(sys.argv[1], 'rb')); print(repr(fn(None, v)))"

            def ours(exp: str, **how):
                t0 = time.perf_counter()
                t0_wall = time.time()
                sweep = run_sweep(
                    trivial, variants, exp_name=exp, mode="ssh", skip_wait=True, **how, **common
                )
                launched = time.perf_counter() - t0
                assert sweep.results() == list(range(100))
                total = time.perf_counter() - t0
                for job in sweep:  # everything came back: the results were read from the local run dirs
                    assert (job.run_dir / "result.pkl").is_file() and (job.run_dir / "status.json").is_file()
                st = [j.status for j in sweep]
                timeline = (
                    launched,
                    min(x["started"] for x in st) - t0_wall,
                    max(x["ended"] for x in st) - t0_wall,
                )
                zips_holder[:] = sweep[0].manifest["backend"]["zips"]
                return (
                    total,
                    dict(sweep[0].mode.stats),
                    sweep[0].manifest["backend"]["variants_per_task"],
                    timeline,
                )

            def doodad_way(chunk):
                cp_zip = [z for z in zips_holder if "/cloudpickle-" in z][0]
                times, results = [], []
                for v in chunk:
                    t = time.perf_counter()
                    local = root / f"payload-{v['i']}.pkl"
                    local.write_bytes(cloudpickle.dumps((trivial, v)))
                    remote = f"{remote_root}/doodad/run_{uuid.uuid4().hex}.pkl"
                    subprocess.run(
                        ["scp", "-q", "-P", str(port), *ssh_opts, str(local), f"{user}@{host}:{remote}"],
                        check=True,
                    )
                    out = subprocess.run(
                        ["ssh", "-p", str(port), *ssh_opts, f"{user}@{host}",
                         f"PYTHONPATH={cp_zip} python3 -c \"{runner}\" {remote}"],
                        check=True, capture_output=True, text=True,
                    )  # fmt: skip
                    results.append(int(out.stdout.strip()))
                    times.append(time.perf_counter() - t)
                assert results == [v["i"] for v in chunk]
                return times

            rounds = 1 if args.quick else 3
            sh(f"mkdir -p {remote_root}/doodad")
            first_total, stats, k, timeline = ours("b7a-0", expected_duration=0.01)  # a fresh host
            totals, doodad, second_stats = [first_total], [], None
            per_round = max(1, n_doodad // rounds)
            for r in range(rounds):
                doodad += doodad_way(variants[r * per_round : (r + 1) * per_round])
                if r < rounds - 1 or rounds == 1:
                    total, second_stats, _, _ = ours(f"b7a-{r + 1}", expected_duration=0.01)
                    totals.append(total)
            doodad_total = statistics.median(doodad) * 100
            ours_median = statistics.median(totals)
            unpacked = stats3 = None
            if not args.quick:
                unpacked, stats3, _, _ = ours("b7one", variants_per_task=1)
            stats2 = second_stats or {}

            table = Table("B7a: 100 trivial variants, every result fetched and read")
            table.add(
                f"run_sweep(mode='ssh'), packed ({k} per task), median of {len(totals)}",
                f"{ours_median:.2f} s",
                f">= {GOAL}x faster",
                f"doodad's way {doodad_total:.1f} s",
                f"{doodad_total / ours_median:.1f}x",
            )
            table.add("  each sweep (the first on a fresh host)", ", ".join(f"{t:.2f} s" for t in totals))
            table.add(
                "  first sweep: launch returned / first run started / last run ended (host clock)",
                " / ".join(f"{x:.2f} s" for x in timeline),
            )
            table.add("  SSH connections opened (launch + wait)", str(stats["connections"]), "1")
            table.add(
                "  snapshot uploads (fresh host / a later sweep of the same code)",
                f"{stats['snapshot_uploads']} / {stats2.get('snapshot_uploads', 0)}",
                "1 / 0",
            )
            table.add(
                "  remote commands started (probe, server) / requests to the server",
                f"{stats['commands']} / {stats['requests']}",
            )
            table.add(
                "  remote commands per poll",
                f"{(stats['requests'] - 1) / max(1, stats['polls']):.0f} (of {stats['polls']} polls)",
                "1",
            )
            table.add(
                "  bytes uploaded (fresh host / a later sweep)",
                f"{stats['upload_bytes']} / {stats2.get('upload_bytes', '-')}",
            )
            if unpacked is not None:
                table.add(
                    "unpacked (variants_per_task=1: one task runner per variant)",
                    f"{unpacked:.2f} s",
                    "",
                    "",
                    f"{doodad_total / unpacked:.1f}x",
                )
                table.add(
                    "  its connections / commands / requests / polls",
                    f"{stats3['connections']} / {stats3['commands']} / {stats3['requests']} / {stats3['polls']}",
                )
            table.add(
                f"doodad's way: scp + ssh per variant (median of {len(doodad)}, between the sweeps) x 100",
                f"{doodad_total:.1f} s",
                "",
                f"{fmt_ms(statistics.median(doodad))} per variant",
            )
            table.print()
        finally:
            try:
                sh(f"rm -rf {remote_root}")
            finally:
                client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
