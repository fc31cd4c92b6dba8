"""Watch a run without training: join the DHT as a client, read the run's records every few seconds and serve the
dashboard and `/api/status`. `python -m peer.monitor --initial-peers ... --run-id ... --port ...`; the bootstrap node
runs the same monitor with `--dashboard-port`."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from peer import preflight
from peer.records import (
    RECORD_BEAM_SIZE,
    HashRecord,
    ProgressRecord,
    SettingsRecord,
    SummaryRecord,
    hashes_key,
    progress_key,
    settings_key,
    summary_key,
)
from peer.swarm_key import OpenAccess, SealError, read_swarm_key, run_access
from peer.swarm_status import Observation, RunHistory, choose_fingerprint, settled_rounds

logger = logging.getLogger(__name__)

DHT_TIMEOUT_S = 10.0  # bound on one DHT lookup
RECORD_TTL_S = 15.0  # progress records expire this long after publication (swarm.RECORD_TTL_S)
MAX_SETTINGS_JSON = 65536  # a stranger's settings record larger than this is ignored


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    """What a monitor watches and where it serves the dashboard."""

    run_id: str = "diloco"
    """The run to watch (the peers' --run-id)."""
    host: str = "0.0.0.0"
    """Address the web server listens on (0.0.0.0: every interface; 127.0.0.1: this machine only)."""
    port: int = 8080
    """TCP port of the web server (0: any free port)."""
    poll_s: float = 2.0
    """Seconds between two reads of the run's records."""
    stale_after_s: float = 10.0
    """A peer whose progress record is older than this is no longer shown as live."""
    wandb_project: str | None = None
    """Log the swarm's aggregate per round to this Weights & Biases project (needs the wandb extra)."""
    swarm_key: str | None = field(default=None, repr=False)
    """A private run's --swarm-key (@FILE, or the key itself): without it a monitor sees nothing of that run."""

    def __post_init__(self) -> None:
        if not self.run_id or any(ch in self.run_id for ch in ". \t\n"):
            raise ValueError(f"--run-id must be non-empty without dots or spaces, got {self.run_id!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if not self.poll_s > 0 or not self.stale_after_s > 0:
            raise ValueError("--poll-s and --stale-after-s must be positive")
        if self.swarm_key is not None:
            read_swarm_key(self.swarm_key)


class RunReader:
    """Reads a run's records from the DHT. hivemind checks their signatures (the monitor's DHT has a
    peer.signing.RecordSigner); a private run's records are opened with its key (peer/swarm_key.py), and every value is
    parsed with its schema here: a bad one is skipped."""

    def __init__(self, dht, *, run_id: str, lock: threading.Lock, access: OpenAccess | None = None):
        self.dht, self.run_id, self.lock = dht, run_id, lock
        self.access = OpenAccess() if access is None else access

    def _records(self, key: str, schema) -> dict:
        """subkey -> (record, expiration time) of every record under a key that opens and parses."""
        records = {}
        for subkey, item in self._entries(key).items():
            try:
                record = _parse(schema, self.access.open(key, subkey, item.value))
            except SealError:
                continue
            if record is not None:
                records[subkey] = (record, item.expiration_time)
        return records

    def _entries(self, key: str) -> dict:
        """subkey -> ValueWithExpiration of a dictionary key (empty if nothing is stored or the lookup failed)."""
        with self.lock:  # hivemind's DHT pipe is not thread-safe
            future = self.dht.get(key, latest=True, beam_size=RECORD_BEAM_SIZE, return_future=True)
        try:
            found = future.result(timeout=DHT_TIMEOUT_S)
        except Exception as e:
            logger.debug(f"DHT get {key} failed: {e!r}")
            return {}
        if found is None or not isinstance(found.value, dict):
            return {}
        return found.value

    def fingerprints(self) -> tuple[dict[str, dict], list[str]]:
        """{fingerprint: settings} and one fingerprint per publishing peer, from `<run_id>_settings`."""
        settings, published = {}, []
        for record, _ in self._records(
            settings_key(self.access.prefix(self.run_id, "records")), SettingsRecord
        ).values():
            published.append(record.fingerprint)
            if record.fingerprint not in settings and len(record.settings_json) <= MAX_SETTINGS_JSON:
                with contextlib.suppress(ValueError):
                    parsed = json.loads(record.settings_json)
                    if isinstance(parsed, dict):
                        settings[record.fingerprint] = parsed
        return settings, published

    def observe(self, fingerprint: str, now: float) -> Observation:
        from hivemind.p2p import PeerID

        observation = Observation(now=now)
        prefix = self.access.prefix(fingerprint, "records")
        for subkey, (record, expiration) in self._records(progress_key(prefix), ProgressRecord).items():
            if len(record.peer_id) <= 64:
                observation.progress[subkey] = (record, expiration - RECORD_TTL_S)
                observation.peer_ids[subkey] = PeerID(record.peer_id).to_base58()
        for subkey, (summary, _) in self._records(summary_key(prefix), SummaryRecord).items():
            observation.summaries[subkey] = summary
        for subkey, (hashes, _) in self._records(hashes_key(prefix), HashRecord).items():
            observation.hashes[subkey] = hashes
        return observation


def _parse(schema, value):
    try:
        return schema.parse_obj(value)
    except Exception:  # data from other peers is not trusted
        return None


class Monitor:
    """Polls a run's records in a background thread and keeps the status the dashboard serves."""

    def __init__(
        self,
        dht,
        *,
        config: MonitorConfig,
        lock: threading.Lock | None = None,
        on_round: Callable[[dict], None] | None = None,
    ):
        from peer.signing import RecordSigner  # lazy: it imports hivemind

        self.config = config
        self.reader = RunReader(
            dht,
            run_id=config.run_id,
            lock=lock or threading.Lock(),
            access=run_access(config.swarm_key, config.run_id),
        )
        with self.reader.lock:
            # strips and checks the signatures of the peers' records; records of other keys pass unchanged
            dht.add_validators([RecordSigner()])
        self.on_round = on_round
        """Called with each round's swarm aggregate once the round is settled (a later one has been seen)."""
        self.history = RunHistory()
        self.fingerprint: str | None = None
        self._last_reported_round = -1
        self._status_lock = threading.Lock()
        self._status = self._compose(None, {}, {}, now=time.time())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_forever, name="monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * DHT_TIMEOUT_S)

    def status(self) -> dict:
        with self._status_lock:
            return self._status

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:  # a monitor keeps serving its last status whatever a poll ran into
                logger.warning(f"monitor poll failed: {e!r}")
            self._stop.wait(self.config.poll_s)

    def poll_once(self) -> None:
        """Read the run's records once and update the status."""
        from hivemind.utils.timed_storage import get_dht_time

        settings, published = self.reader.fingerprints()
        fingerprint, counts = choose_fingerprint(published)
        if fingerprint is None and self.fingerprint is not None:
            fingerprint = self.fingerprint  # the settings records lapsed for a moment: keep watching the run
        if fingerprint != self.fingerprint:
            if self.fingerprint is not None:
                logger.info(f"run {self.config.run_id}: fingerprint {self.fingerprint} -> {fingerprint}")
            self.fingerprint, self.history, self._last_reported_round = fingerprint, RunHistory(), -1
        now = get_dht_time()
        if fingerprint is not None:
            self.history.observe(
                self.reader.observe(fingerprint, now), stale_after_s=self.config.stale_after_s
            )
        status = self._compose(fingerprint, settings.get(fingerprint, {}), counts, now=now)
        with self._status_lock:
            self._status = status
        self._report_settled_rounds(status)

    def _compose(self, fingerprint: str | None, settings: dict, counts: dict, *, now: float) -> dict:
        return {
            "run_id": self.config.run_id,
            "fingerprint": fingerprint,
            "fingerprints": counts,
            "settings": settings,
            "updated_at": now,
            "stale_after_s": self.config.stale_after_s,
            **self.history.status(now=now, stale_after_s=self.config.stale_after_s),
        }

    def _report_settled_rounds(self, status: dict) -> None:
        if self.on_round is None:
            return
        for row in settled_rounds(status["rounds"], after=self._last_reported_round):
            self._last_reported_round = row["round"]
            try:
                self.on_round({**row, **status["totals"]})
            except Exception as e:  # wandb trouble must not stop the dashboard
                logger.warning(f"could not report round {row['round']}: {e!r}")


# ---- the command line ----------------------------------------------------------------------------------------------


class _OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    defaults = MonitorConfig()
    p = _OneLineArgumentParser(
        prog="python -m peer.monitor",
        description="Watch a DiLoCo swarm without training: join its DHT and serve a live dashboard "
        "(the page at /, the same data as JSON at /api/status).",
    )
    p.add_argument(
        "--initial-peers",
        nargs="+",
        required=True,
        metavar="MADDR",
        help="multiaddrs of the bootstrap node or any live peer",
    )
    p.add_argument("--run-id", default=defaults.run_id, help="the run to watch (default %(default)s)")
    p.add_argument(
        "--host",
        default=defaults.host,
        help="address the dashboard listens on (default %(default)s: every interface; 127.0.0.1: this machine)",
    )
    p.add_argument("--port", type=int, default=defaults.port, help="dashboard TCP port (default %(default)s)")
    p.add_argument(
        "--poll-s",
        type=float,
        default=defaults.poll_s,
        help="seconds between reads of the DHT (default %(default)s)",
    )
    p.add_argument(
        "--stale-after-s",
        type=float,
        default=defaults.stale_after_s,
        help="a peer silent for this long is no longer live (default %(default)s)",
    )
    p.add_argument(
        "--wandb-project",
        default=None,
        help="also log the swarm's loss, tokens and bytes per round to this Weights & Biases project "
        "(pip install 'diloco-swarm[wandb]')",
    )
    p.add_argument(
        "--swarm-key",
        metavar="@FILE",
        help="a private run's --swarm-key: @FILE reads it from a file, other text is the key itself",
    )
    p.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = MonitorConfig(
            run_id=args.run_id,
            host=args.host,
            port=args.port,
            poll_s=args.poll_s,
            stale_after_s=args.stale_after_s,
            wandb_project=args.wandb_project,
            swarm_key=args.swarm_key,
        )
    except ValueError as e:
        parser.error(str(e))
    try:  # before importing hivemind and torch: a typo, a busy port or a dead address is reported at once
        preflight.check_monitor(initial_peers=args.initial_peers, host=config.host, port=config.port)
    except preflight.PreflightError as e:
        if e.exit_code == 2:
            parser.error(str(e))
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s [monitor] %(message)s")
    stop = threading.Event()
    main_pid = os.getpid()

    def handle(signum, _frame) -> None:
        if os.getpid() == main_pid:  # forked hivemind processes inherit this; the main process stops them
            logger.info(f"received {signal.Signals(signum).name}, shutting down")
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    from peer.__main__ import die_with_parent

    die_with_parent()
    try:
        return serve(config, initial_peers=args.initial_peers, stop=stop)
    except MonitorError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1


class MonitorError(RuntimeError):
    """A problem the user can fix (unreachable peers, a busy port, wandb missing); shown as one line."""


class Dashboard:
    """A monitor of one run and the web server showing it, on a DHT this process already runs (the monitor's own
    client DHT, or the bootstrap node's)."""

    def __init__(self, dht, *, config: MonitorConfig, lock: threading.Lock | None = None):
        from peer.dashboard.server import DashboardServer

        self.on_round = None
        if config.wandb_project:
            from peer.wandb_sink import SwarmWandb, WandbError

            try:
                self.on_round = SwarmWandb(config.wandb_project, run_id=config.run_id)
            except WandbError as e:
                raise MonitorError(str(e)) from None
        self.monitor = Monitor(dht, config=config, lock=lock, on_round=self.on_round)
        self.server = DashboardServer(self.monitor.status, host=config.host, port=config.port)

    def start(self) -> int:
        """Start polling and serving; returns the web server's port. Raises MonitorError if it cannot listen."""
        from peer.dashboard.server import DashboardError

        try:
            port = self.server.start()
        except DashboardError as e:
            self.stop()
            raise MonitorError(str(e)) from None
        self.monitor.start()
        return port

    def stop(self) -> None:
        self.monitor.stop()
        self.server.stop()
        if self.on_round is not None:
            self.on_round.finish()


def serve(config: MonitorConfig, *, initial_peers: list[str], stop: threading.Event) -> int:
    """Join the DHT as a client, poll the run and serve the dashboard until `stop` is set."""
    import hivemind

    try:
        dht = hivemind.DHT(
            initial_peers=list(initial_peers), client_mode=True, start=True, await_ready=True, wait_timeout=30
        )
    except Exception as e:  # hivemind raises several types with long messages
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MonitorError(f"could not join the DHT ({first_line}); check --initial-peers") from None
    try:
        dashboard = Dashboard(dht, config=config)
        port = dashboard.start()
        try:
            print(f"dashboard of run {config.run_id}: {dashboard_url(config.host, port)}", flush=True)
            stop.wait()
        finally:
            dashboard.stop()
        return 0
    finally:
        dht.shutdown()


def dashboard_url(host: str, port: int) -> str:
    return f"http://{_display_host(host)}:{port}/"


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


if __name__ == "__main__":
    sys.exit(main())
