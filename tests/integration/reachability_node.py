"""A bare DHT node that serves reachability checks and, with --ask, asks others to dial it back and prints the
answers and the classification as one JSON line (run in a network namespace by test_nat.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import hivemind

from peer.reachability import ask_peers_to_dial_back, classify, serve_reachability_checks


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--ask", action="store_true")
    parser.add_argument("--serve-s", type=float, default=0.0)
    args = parser.parse_args()
    dht = hivemind.DHT(
        initial_peers=args.initial_peers,
        host_maddrs=[f"/ip4/{args.host}/tcp/0"],
        start=True,
        await_ready=True,
    )
    try:
        dht.run_coroutine(serve_reachability_checks)
        print(json.dumps({"ready": str(dht.peer_id)}), flush=True)
        if args.ask:
            maddrs = [str(m) for m in dht.get_visible_maddrs(latest=True)]
            answers = dht.run_coroutine(partial(ask_peers_to_dial_back, maddrs=maddrs))
            kind = classify(client_mode=False, answers=answers, relay_addresses=[]).kind
            print(json.dumps({"answers": answers, "kind": kind, "maddrs": maddrs}), flush=True)
        time.sleep(args.serve_s)
    finally:
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
