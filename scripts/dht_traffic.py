"""Where a swarm's DHT traffic goes, by record kind: runs scripts/local_swarm.py (bootstrap node and N peers on
127.0.0.1) with a hook in every process that counts the bytes of each DHT request and response its node serves, by
the key asked for, and the lookups and stores its node makes, by key name; then prints the totals per kind of key
(progress, settings, hashes, summary records; the averager's matchmaking keys; pings).

    python scripts/dht_traffic.py --peers 8 --rounds 5

The hook (a sitecustomize module on PYTHONPATH, active only with DHT_TRAFFIC_DIR set) wraps hivemind's DHTProtocol
handlers and DHTNode.get/store; nothing of the project is changed. Bytes are protobuf sizes of requests plus
responses, summed over all nodes: each byte crossed the loopback once.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

HOOK = """
import os
if os.environ.get("DHT_TRAFFIC_DIR"):
    import functools, json, threading, time
    from hivemind.dht.node import DHTNode
    from hivemind.dht.protocol import DHTProtocol
    from hivemind.dht.routing import DHTID

    served, asked, dumping = {}, {}, set()

    def dump_periodically():
        pid = os.getpid()
        if pid in dumping:  # one dumper per process (the DHT runs in a forked child)
            return
        dumping.add(pid)

        def dump():
            while True:
                time.sleep(2)
                with open(os.path.join(os.environ["DHT_TRAFFIC_DIR"], f"{pid}.json"), "w") as out:
                    json.dump({"served": served, "asked": asked}, out)

        threading.Thread(target=dump, daemon=True).start()

    def count_served(name):
        original = getattr(DHTProtocol, name)

        @functools.wraps(original)  # hivemind reads the handler's type annotations
        async def handler(self, request, context):
            dump_periodically()
            response = await original(self, request, context)
            keys = list(getattr(request, "keys", []))
            key_id = keys[0].hex() if keys else "-"
            entry = served.setdefault(key_id, [0, 0])
            entry[0] += 1
            entry[1] += request.ByteSize() + (response.ByteSize() if response is not None else 0)
            return response

        setattr(DHTProtocol, name, handler)

    def count_asked(name):
        original = getattr(DHTNode, name)

        @functools.wraps(original)
        async def method(self, key, *args, **kwargs):
            dump_periodically()
            entry = asked.setdefault(DHTID.generate(source=key).to_bytes().hex(), [str(key)[:80], 0, 0])
            entry[1 if name == "get" else 2] += 1
            return await original(self, key, *args, **kwargs)

        setattr(DHTNode, name, method)

    for name in ("rpc_find", "rpc_store", "rpc_ping"):
        count_served(name)
    count_asked("get")
    count_asked("store")
"""


def kind_of(name: str | None) -> str:
    if name is None:
        return "pings and routing"
    for suffix in ("progress", "settings", "hashes", "summary", "all_averagers"):
        if name.endswith(suffix):
            return suffix
    if re.search(r"\.0b[01]+$", name):
        return "matchmaking (group keys)"
    return "other: " + name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=8, help="peers (default 8)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    args, swarm_args = p.parse_known_args(argv)
    if args.peers < 2 or args.rounds < 1:
        p.error("--peers must be at least 2 and --rounds at least 1")
    with tempfile.TemporaryDirectory(prefix="dht_traffic_") as tmp:
        hook_dir, out_dir = Path(tmp, "hook"), Path(tmp, "out")
        hook_dir.mkdir()
        out_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        env = dict(os.environ, DHT_TRAFFIC_DIR=str(out_dir))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook_dir), env.get("PYTHONPATH")]))
        command = [sys.executable, str(REPO_ROOT / "scripts" / "local_swarm.py")]
        command += ["--peers", str(args.peers), "--rounds", str(args.rounds), *swarm_args]
        run = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"dht_traffic: error: the local swarm failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
            return 1
        served, names = collections.Counter(), {}
        requests, gets, stores = collections.Counter(), collections.Counter(), collections.Counter()
        for path in out_dir.glob("*.json"):
            dump = json.loads(path.read_text())
            for key_id, (count, size) in dump["served"].items():
                served[key_id] += size
                requests[key_id] += count
            for key_id, (name, num_gets, num_stores) in dump["asked"].items():
                names[key_id] = name
                gets[key_id] += num_gets
                stores[key_id] += num_stores
    by_kind, counts = collections.Counter(), collections.defaultdict(lambda: [0, 0, 0])
    for key_id, size in served.items():
        kind = kind_of(names.get(key_id))
        by_kind[kind] += size
        counts[kind][0] += gets[key_id]
        counts[kind][1] += stores[key_id]
        counts[kind][2] += requests[key_id]
    total = sum(by_kind.values())
    print(run.stdout.strip().splitlines()[-1])
    print(f"DHT bytes, all nodes, {args.peers} peers, {args.rounds} rounds: {total / 1e6:.1f} MB")
    print(f"{'kind':<26} {'MB':>7} {'share':>6} {'lookups':>8} {'stores':>7} {'requests served':>16}")
    for kind, size in by_kind.most_common():
        num_gets, num_stores, num_requests = counts[kind]
        print(
            f"{kind:<26} {size / 1e6:>7.2f} {size / total:>6.1%} {num_gets:>8} {num_stores:>7} {num_requests:>16}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
