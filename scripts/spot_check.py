"""Networked spot check: K real peers on 127.0.0.1 follow the simulation's held-out loss, round for round.

    python scripts/spot_check.py --peers 4 --rounds 8 --inner-steps 5
    python scripts/spot_check.py --json > docs/results/spot_check.json

Starts a bootstrap node and K peers (`python -m peer --data-shard i/K --wait-for-peers K --eval-every 1`) and,
beside them, `python -m peer.simulate --replicas K --json` with the same training flags. Prints one row per
round: the peers' held-out loss (all K must be equal), the simulation's, their difference, and whether every
peer's global-parameter sha256 equals the simulation's. Exits 1 if any round differs, 2 on bad flags.
Progress goes to stderr; the table (or, with --json, the same as JSON) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from swarm_procs import Child, read_records, start_bootstrap, wait_for_file  # noqa: E402

# peer.simulate evaluates the held-out windows 32 per forward pass and a peer evaluates --batch-size per forward
# pass; the losses are bit-identical only when the forward passes have the same shape, so the peers train and
# evaluate with 32 sequences per step and the simulation reads --eval-batches x 32 windows.
BATCH_SIZE = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--peers", type=int, default=4, help="networked peers = simulated replicas (default 4)"
    )
    parser.add_argument("--rounds", type=int, default=8, help="outer rounds (default 8)")
    parser.add_argument("--inner-steps", type=int, default=5, help="H, inner steps per round (default 5)")
    parser.add_argument("--model", default="tiny", help="model preset (default tiny)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument(
        "--inner-lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=5, help="linear warmup in global steps (default 5)"
    )
    parser.add_argument(
        "--eval-batches", type=int, default=4, help="held-out batches of 32 sequences (default 4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="model and data seed (default 0)")
    parser.add_argument("--run-dir", help="where logs and metrics go (default: a new temporary directory)")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=900,
        help="give up (and stop everything) after this long (default 900)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document")
    args = parser.parse_args(argv)
    if min(args.peers, args.rounds, args.inner_steps, args.eval_batches) < 1:
        parser.error("--peers, --rounds, --inner-steps and --eval-batches must be at least 1")
    return args


def training_flags(args: argparse.Namespace) -> list[str]:
    """Everything that decides the numbers; given verbatim to every peer and to the simulation."""
    return [
        "--model", args.model,
        "--seed", str(args.seed),
        "--max-rounds", str(args.rounds),
        "--inner-steps", str(args.inner_steps),
        "--batch-size", str(BATCH_SIZE),
        "--seq-len", str(args.seq_len),
        "--inner-lr", str(args.inner_lr),
        "--outer-momentum", "0.9",  # pinned: the documented run predates the 0.5 default of the CPU presets
        "--warmup-steps", str(args.warmup_steps),
        "--device", "cpu",
        "--num-threads", "1",
    ]  # fmt: skip


def peer_argv(
    args: argparse.Namespace, index: int, maddrs: list[str], run_dir: Path, run_id: str
) -> list[str]:
    return [
        sys.executable, "-m", "peer",
        *training_flags(args),
        "--data-shard", f"{index}/{args.peers}",
        "--eval-every", "1",
        "--eval-batches", str(args.eval_batches),
        "--wait-for-peers", str(args.peers),
        "--initial-peers", *maddrs,
        "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
        "--run-id", run_id,
        "--matchmaking-s", "2",
        "--progress-period-s", "1",
        "--metrics-file", str(run_dir / f"peer{index}.jsonl"),
    ]  # fmt: skip


def simulation_argv(args: argparse.Namespace) -> list[str]:
    # one evaluation per round (every H steps per replica) on the windows the peers evaluate on
    return [
        sys.executable, "-m", "peer.simulate",
        "--replicas", str(args.peers),
        *training_flags(args),
        "--eval-every-steps", str(args.inner_steps),
        "--eval-windows", str(args.eval_batches * BATCH_SIZE),
        "--json",
    ]  # fmt: skip


class Simulation:
    """`python -m peer.simulate --json` in its own session: JSON on stdout to a file, logs to another."""

    def __init__(self, argv: list[str], run_dir: Path, env: dict):
        self.json_path, self.log_path = run_dir / "simulation.json", run_dir / "simulation.log"
        self._out, self._log = open(self.json_path, "wb"), open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._out, stderr=self._log, env=env, start_new_session=True
        )

    def result(self) -> dict:
        if self.proc.returncode != 0:
            raise RuntimeError(f"the simulation exited with {self.proc.returncode}; see {self.log_path}")
        try:
            return json.loads(self.json_path.read_text())
        except ValueError as e:
            raise RuntimeError(f"the simulation printed no valid JSON ({e}); see {self.json_path}") from None

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # nothing to save: it only computes
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)
        self._out.close()
        self._log.close()


def compare(peer_records: dict[str, list[dict]], simulated: dict, num_rounds: int) -> list[dict]:
    """One row per round: the peers' held-out losses and hashes against the simulation's."""
    sim_rounds = {r["round"]: r for r in simulated["rounds"]}
    rows = []
    for rnd in range(1, num_rounds + 1):
        ours = {
            name: next((r for r in recs if r["round"] == rnd), None) for name, recs in peer_records.items()
        }
        losses = {name: r.get("eval_loss") if r else None for name, r in ours.items()}
        hashes = {name: r["global_params_sha256"] if r else None for name, r in ours.items()}
        sim = sim_rounds.get(rnd, {})
        sim_loss, sim_hash = sim.get("eval_loss"), sim.get("global_params_sha256")
        peers_equal = None not in losses.values() and len(set(losses.values())) == 1
        net_loss = next(iter(losses.values())) if peers_equal else None
        hashes_equal = sim_hash is not None and all(h == sim_hash for h in hashes.values())
        rows.append(
            {
                "round": rnd,
                "eval_loss_networked": net_loss,
                "eval_loss_by_peer": losses,
                "peers_agree": peers_equal,
                "eval_loss_simulated": sim_loss,
                "difference": None if net_loss is None or sim_loss is None else net_loss - sim_loss,
                "group_sizes": [r["group_size"] if r else None for r in ours.values()],
                "sha256_simulated": sim_hash,
                "sha256_by_peer": hashes,
                "sha256_equal": hashes_equal,
                "match": peers_equal and net_loss == sim_loss and hashes_equal,
            }
        )
    return rows


def format_table(rows: list[dict], num_peers: int) -> str:
    def loss(value: float | None) -> str:
        return f"{value:.6f}" if value is not None else "-"

    lines = [
        f"{'round':>5}  {f'peers (all {num_peers})':>15}  {'simulation':>10}  {'difference':>10}  "
        f"{'sha256 all equal':>16}  {'group':>5}  hash",
        "-" * 86,
    ]
    for row in rows:
        net = loss(row["eval_loss_networked"]) if row["peers_agree"] else "DIFFER"
        diff = "-" if row["difference"] is None else f"{row['difference']:.1e}" if row["difference"] else "0"
        group = ",".join(sorted({"-" if g is None else str(g) for g in row["group_sizes"]}))
        lines.append(
            f"{row['round']:>5}  {net:>15}  {loss(row['eval_loss_simulated']):>10}  {diff:>10}  "
            f"{'yes' if row['sha256_equal'] else 'NO':>16}  {group:>5}  {(row['sha256_simulated'] or '-')[:12]}"
        )
    return "\n".join(lines)


def stop_all(children: list[Child], simulation: Simulation | None, grace_s: float = 10.0) -> None:
    """SIGTERM every child at once, give them grace_s together to exit cleanly, then SIGKILL their sessions.

    Ctrl+C and SIGTERM are ignored meanwhile, so a second one cannot leave processes behind."""
    previous = {
        sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        if simulation is not None:
            simulation.stop()
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in children):
            time.sleep(0.2)
        for child in children:
            child.kill()  # SIGKILL to the whole session: hivemind's helper processes too
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM / SIGHUP clean up like Ctrl+C


def run(args: argparse.Namespace, run_dir: Path) -> dict:
    """Start everything, wait (bounded) for the peers' last round and the simulation, compare, clean up."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    run_id = f"spot-check-{os.getpid()}"
    deadline = time.monotonic() + args.timeout_s
    started = time.perf_counter()
    children: list[Child] = []
    simulation: Simulation | None = None
    try:
        bootstrap = start_bootstrap(run_dir, env)
        children.append(bootstrap)
        maddrs = wait_for_file(run_dir / "bootstrap.maddrs", bootstrap, min(120, args.timeout_s))
        peers = {}
        for i in range(args.peers):
            peers[f"peer{i}"] = Child(f"peer{i}", peer_argv(args, i, maddrs, run_dir, run_id), run_dir, env)
            children.append(peers[f"peer{i}"])
        simulation = Simulation(simulation_argv(args), run_dir, env)
        print(f"bootstrap {maddrs[0]}; {args.peers} peers and the simulation started; logs in {run_dir}",
              file=sys.stderr, flush=True)  # fmt: skip
        shown = dict.fromkeys(peers, 0)
        peers_done_s = None
        while True:
            for name, child in peers.items():
                records = read_records(run_dir / f"{name}.jsonl")
                for r in records[shown[name] :]:
                    print(f"{name} round {r['round']} | eval {r.get('eval_loss', float('nan')):.6f} | "
                          f"peers {r['group_size']} | hash {r['global_params_sha256'][:12]}",
                          file=sys.stderr, flush=True)  # fmt: skip
                shown[name] = len(records)
                code = child.proc.poll()
                if code is not None and (code != 0 or len(records) < args.rounds):
                    raise RuntimeError(
                        f"{name} exited with {code} after {len(records)} rounds; see {child.log_path}"
                    )
            peers_exited = all(child.proc.poll() is not None for child in peers.values())
            if peers_exited and peers_done_s is None:
                peers_done_s = time.perf_counter() - started
            if simulation.proc.poll() not in (None, 0):
                simulation.result()  # raises with the log's path
            if peers_exited and simulation.proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {args.timeout_s:.0f}s; see logs in {run_dir}")
            time.sleep(0.5)
        simulated = simulation.result()
        peer_records = {name: read_records(run_dir / f"{name}.jsonl") for name in peers}
    finally:
        stop_all(children, simulation)
    rows = compare(peer_records, simulated, args.rounds)
    return {
        "command": "python scripts/spot_check.py " + shlex.join(sys.argv[1:]),
        "peer_command": shlex.join(
            ["python", "-m", "peer", *peer_argv(args, 0, ["BOOTSTRAP"], Path("."), run_id)[3:]]
        ),
        "simulation_command": shlex.join(["python", *simulation_argv(args)[1:]]),
        "peers": args.peers,
        "rounds": rows,
        "all_match": all(row["match"] for row in rows),
        "peers_wall_s": peers_done_s,
        "simulation_wall_s": simulated.get("wall_s"),
        "wall_s": time.perf_counter() - started,
        "run_dir": str(run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="diloco-spot-check-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        result = run(args, run_dir)
    except KeyboardInterrupt:
        print("interrupted; every process this check started has been stopped", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result["rounds"], args.peers))
        print(
            f"\n{'all rounds match' if result['all_match'] else 'MISMATCH'}: {args.peers} networked peers against "
            f"the simulation, {args.rounds} rounds; {result['wall_s']:.0f}s (peers {result['peers_wall_s']:.0f}s, "
            f"simulation {result['simulation_wall_s']:.0f}s)"
        )
    return 0 if result["all_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
