"""The lost-stream defect at the p2p level, without the all-reduce: two hivemind P2P instances on 127.0.0.1; a
streaming handler sends --messages messages of 512 KiB and ends; the caller reads them, slowly at the end (as a
busy averager does). Each mode runs --streams streams under the same conditions and counts those that ended
early, without any error, one or more messages short.

- server-closes: hivemind's stock behavior, the handler returns after its last message and its end of the
  stream closes first. p2pd (stream.go, doStreamPipe) then calls Close() on the yamux stream: CloseRead()
  wakes the daemon's other pipe goroutine, whose Read fails with ErrStreamReset and which calls Reset(); when
  it gets there before CloseWrite(), the peer receives RST instead of FIN and yamux drops the data it had
  buffered but not yet handed to the reader.
- caller-hangs-up: the protocol of peer/allreduce.py, the caller closes its end once it has every message and
  the handler keeps its end open until then (hivemind cancels a handler whose caller hung up).

    python scripts/repro_stream_reset.py --streams 3000 --hogs 3 --daemon-threads 16

More daemon threads than cores (GOMAXPROCS, --daemon-threads) make the race far more frequent; CPU hogs
(`yes > /dev/null`, --hogs) stand in for a loaded machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

MODES = ("server-closes", "caller-hangs-up")
MESSAGE_BYTES = 512 * 1024  # hivemind's default all-reduce part size
HANG_UP_TIMEOUT_S = 30.0


async def run_mode(mode: str, args: argparse.Namespace) -> dict:
    from hivemind.p2p import P2P
    from hivemind.proto import averaging_pb2, runtime_pb2

    payload = runtime_pb2.Tensor(buffer=b"x" * MESSAGE_BYTES)
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    caller = await P2P.create(initial_peers=await server.get_visible_maddrs())
    handlers_done = 0

    async def handler(requests, _context):
        nonlocal handlers_done
        try:
            async for _ in requests:
                pass
            for _ in range(args.messages):
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=payload)
            if mode == "caller-hangs-up":
                await asyncio.sleep(HANG_UP_TIMEOUT_S)  # cancelled by hivemind when the caller hangs up
        finally:
            handlers_done += 1

    await server._add_protobuf_stream_handler("repro", handler, averaging_pb2.AveragingData)

    async def one_stream() -> int:
        async def request():
            yield averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING)

        stream = await caller.iterate_protobuf_handler(
            server.peer_id, "repro", request(), averaging_pb2.AveragingData
        )
        received = 0
        try:
            async for _ in stream:
                received += 1
                if received == args.messages - 1:
                    await asyncio.sleep(0.002)  # a busy reader: the last message waits in the daemon
                if mode == "caller-hangs-up" and received == args.messages:
                    break
        finally:
            await stream.aclose()
        return received

    started, received = time.monotonic(), []
    try:
        for _ in range(args.streams // args.concurrency):
            received += await asyncio.gather(*[one_stream() for _ in range(args.concurrency)])
        deadline = time.monotonic() + HANG_UP_TIMEOUT_S + 5
        while handlers_done < len(received) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await caller.shutdown()
        await server.shutdown()
    return {
        "mode": mode,
        "streams": len(received),
        "short": sum(r != args.messages for r in received),
        "handlers_finished": handlers_done,
        "wall_s": round(time.monotonic() - started, 1),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=3000, help="streams per mode (default 3000)")
    p.add_argument("--messages", type=int, default=4, help="messages of 512 KiB per stream (default 4)")
    p.add_argument("--concurrency", type=int, default=6, help="streams open at once (default 6)")
    p.add_argument("--hogs", type=int, default=3, help="`yes > /dev/null` processes beside (default 3)")
    p.add_argument(
        "--daemon-threads", type=int, default=16, help="GOMAXPROCS of the p2p daemons (default 16)"
    )
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    args.modes = args.modes.split(",")
    if bad := [m for m in args.modes if m not in MODES]:
        p.error(f"--modes: unknown {bad}")
    if min(args.streams, args.messages, args.concurrency) < 1 or args.hogs < 0 or args.daemon_threads < 0:
        p.error("--streams, --messages and --concurrency must be positive, --hogs and --daemon-threads >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.daemon_threads:
        os.environ["GOMAXPROCS"] = str(
            args.daemon_threads
        )  # hivemind starts p2pd with a copy of our environment
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.hogs)]
    try:
        results = [asyncio.run(run_mode(mode, args)) for mode in args.modes]
    except KeyboardInterrupt:
        return 130
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    if args.json:
        print(json.dumps({"args": vars(args), "results": results}))
    else:
        for r in results:
            print(
                f"{r['mode']:>15}: {r['short']} of {r['streams']} streams ended short "
                f"({args.messages} x 512 KiB each, {args.hogs} hogs, GOMAXPROCS {args.daemon_threads or 'default'}, "
                f"{r['wall_s']} s)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
