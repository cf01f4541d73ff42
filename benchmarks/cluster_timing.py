"""Cluster timing on loopback: discovery, failure detection, re-admission, re-election.

    python benchmarks/cluster_timing.py [--rounds 3] [--nodes 3]

Starts real member processes (tests/helpers/cluster_member.py) with zeroconf on 127.0.0.1 and
prints a table of medians/maxima over the rounds.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.cluster_checks import (
    start_member,
    wait_converged,
    wait_serving,
    write_secret,
)
from tests.helpers.nodes import NodeProcess


def one_round(n: int, workdir: Path) -> dict[str, float]:
    secret = write_secret(workdir / "secret", "bench")
    members: list[NodeProcess] = []
    try:
        launched = time.monotonic()
        members = [start_member(f"b{i}", workdir, secret_file=secret) for i in range(n)]
        wait_serving(members)
        served = time.monotonic() - launched
        ids = {m.node_id for m in members}
        discovery, master = wait_converged([m.url for m in members], ids, 10)
        time.sleep(1.0)
        # SIGSTOP a non-master: failure detection and re-admission.
        victim = next(m for m in members if m.node_id != master)
        rest = [m for m in members if m is not victim]
        victim.send_signal(signal.SIGSTOP)
        detect, _ = wait_converged([m.url for m in rest], ids - {victim.node_id}, 10)
        victim.send_signal(signal.SIGCONT)
        readmit, _ = wait_converged([m.url for m in members], ids, 10)
        time.sleep(1.0)
        # SIGKILL the master: re-election.
        old = next(m for m in members if m.node_id == master)
        rest = [m for m in members if m is not old]
        old.send_signal(signal.SIGKILL)
        reelect, _ = wait_converged([m.url for m in rest], ids - {master}, 10)
        return {
            "launch -> HTTP up (all)": served,
            "HTTP up -> all agree (discovery)": discovery,
            "SIGSTOP -> removed everywhere": detect,
            "SIGCONT -> re-admitted everywhere": readmit,
            "SIGKILL master -> new master agreed": reelect,
        }
    finally:
        for m in members:
            m.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            for k, v in one_round(args.nodes, Path(d)).items():
                results.setdefault(k, []).append(v)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    width = max(len(k) for k in results)
    print(f"{'measure (s)':<{width}}  median   max   ({args.nodes} nodes, {args.rounds} rounds)")
    for k, vs in results.items():
        print(f"{k:<{width}}  {statistics.median(vs):6.2f} {max(vs):6.2f}")


if __name__ == "__main__":
    main()
