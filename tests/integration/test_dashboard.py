"""The swarm monitor and its dashboard against a real local DHT: records published by pretend peers (and by a live
swarm), read by `python -m peer.monitor` and by the bootstrap node's --dashboard-port, served as /api/status and as a
page that a real headless browser renders."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.integration.dht_records import RecordPublisher
from tests.integration.harness import Proc, child_env, wait_for

RUN_ID = "dash"
FINGERPRINT = "0123456789abcdef"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Debian's chromium (scripts/setup.sh installs it when run as root on Debian)",
)


def dashboard_url(proc: Proc, *, timeout_s: float = 60) -> str:
    """The URL the monitor or bootstrap node logged once its dashboard listened."""

    def logged():
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
        found = re.search(r"dashboard of run \S+: (http://\S+)", proc.log())
        return found.group(1) if found else None

    return wait_for(logged, timeout_s=timeout_s, what=f"{proc.name}'s dashboard URL")


def get_status(url: str) -> dict:
    with urllib.request.urlopen(url + "api/status", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/json")
        return json.load(response)


def metrics(round_index: int, peer: int) -> dict:
    """A pretend peer's metrics record for a round: peer i processes (i + 1) x 1024 tokens per round."""
    record = {
        "round": round_index,
        "loss": 7.0 - 0.3 * round_index + 0.1 * peer,
        "global_params_sha256": f"{round_index:064x}",
        "tokens": 1024 * (peer + 1) * round_index,
        "round_tokens": 1024 * (peer + 1),
        "tokens_per_s": 500.0 * (peer + 1),
        "bytes_sent": 1000,
        "bytes_received": 2000,
        "group_size": 2,
        "failed_rounds": 0,
        "resyncs": 0,
    }
    if round_index % 2 == 0:
        record["eval_loss"] = 6.5 - 0.2 * round_index
    return record


def browse(url: str, out_dir: Path, name: str) -> str:
    """Open the page in headless chromium: returns the DOM after its scripts ran; saves a screenshot."""
    common = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # tests run as root
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,1100",
        "--virtual-time-budget=6000",  # let the page fetch /api/status and draw
    ]
    shot = out_dir / f"{name}.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=120, env=child_env()
    )
    assert shot.stat().st_size > 10_000
    dom = subprocess.run(
        [*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120, env=child_env()
    )
    return dom.stdout


@pytest.fixture
def publishers(local_swarm):
    """Two pretend peers of run `dash` and one of the same run id with other settings, in a local DHT."""
    maddrs = local_swarm.start_bootstrap()
    made = []
    try:
        for fingerprint in (FINGERPRINT, FINGERPRINT, "fedcba9876543210"):
            made.append(RecordPublisher(maddrs, run_id=RUN_ID, fingerprint=fingerprint))
        yield made
    finally:
        for publisher in made:
            publisher.shutdown()


def publish_run(honest: list[RecordPublisher], rounds: int, *, other: RecordPublisher | None = None) -> None:
    """Two peers' settings, summaries and hashes for `rounds` rounds (they disagree on round 2); `other` publishes
    another fingerprint under the same run id, and garbage under the run's summary key."""
    for publisher in [*honest, *([other] if other else [])]:
        publisher.publish_settings(
            {"run_id": RUN_ID, "inner_steps": 5, "fingerprint_of": publisher.fingerprint}
        )
    for round_index in range(1, rounds + 1):
        for i, publisher in enumerate(honest):
            publisher.publish_round(metrics(round_index, i), reachability=("direct", "relayed")[i])
    honest[0].publish_hashes({r: f"{r:064x}" for r in range(1, rounds + 1)})
    honest[1].publish_hashes({r: f"{r:064x}" if r != 2 else "e" * 64 for r in range(1, rounds + 1)})
    if other is not None:  # a stranger's garbage under the run's summary key: skipped, never a crash
        other.store(f"{FINGERPRINT}_summary", {"peer_id": "x", "round": -5, "loss": "low"})


def refresh_progress(publishers: list[RecordPublisher], round_index: int) -> None:
    """Progress and settings records live 15 s: keep the pretend peers live while the test looks, as peers do."""
    for i, publisher in enumerate(publishers):
        publisher.publish_progress(round_index, client_mode=i == 1)
        publisher.publish_settings(
            {"run_id": RUN_ID, "inner_steps": 5, "fingerprint_of": publisher.fingerprint}
        )


def test_monitor_shows_the_runs_records(local_swarm, publishers, tmp_path, monkeypatch):
    rounds = 4
    publish_run(publishers[:2], rounds, other=publishers[2])
    monkeypatch.setenv(
        "WANDB_MODE", "offline"
    )  # the monitor's child process logs the swarm aggregate to disk
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monitor = Proc(
        "monitor",
        [
            "-m",
            "peer.monitor",
            "--initial-peers",
            *local_swarm.bootstrap_maddrs,
            "--run-id",
            RUN_ID,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--poll-s",
            "0.5",
            *(["--wandb-project", "diloco-test"] if HAVE_WANDB else []),
        ],
        tmp_path,
    )
    local_swarm.procs.append(monitor)
    url = dashboard_url(monitor)

    def complete():
        refresh_progress(publishers[:2], rounds)
        publishers[2].publish_settings({"run_id": RUN_ID, "fingerprint_of": publishers[2].fingerprint})
        status = get_status(url)
        return status if len(status["peers"]) == 2 and len(status["rounds"]) == rounds else None

    status = wait_for(complete, timeout_s=60, what="both peers and all rounds in /api/status", interval_s=0.5)
    assert status["run_id"] == RUN_ID and status["fingerprint"] == FINGERPRINT
    assert status["fingerprints"] == {FINGERPRINT: 2, "fedcba9876543210": 1}
    assert status["settings"]["fingerprint_of"] == FINGERPRINT
    peers = {p["peer_id"]: p for p in status["peers"]}
    assert set(peers) == {publishers[0].peer_id, publishers[1].peer_id}  # the peers' own base58 ids
    first, second = peers[publishers[0].peer_id], peers[publishers[1].peer_id]
    assert (first["round"], first["reachability"], first["tokens"]) == (rounds, "direct", 1024 * rounds)
    assert (second["reachability"], second["tokens_per_s"], second["eval_loss"]) == (
        "relayed",
        1000.0,
        pytest.approx(6.5 - 0.2 * rounds),
    )
    by_round = {row["round"]: row for row in status["rounds"]}
    for round_index in range(1, rounds + 1):
        a, b = metrics(round_index, 0), metrics(round_index, 1)
        expected = (a["loss"] * 1024 + b["loss"] * 2048) / 3072  # token-weighted
        assert by_round[round_index]["loss"] == pytest.approx(expected)
        assert by_round[round_index]["tokens"] == 3072
        assert by_round[round_index]["distinct_hashes"] == (2 if round_index == 2 else 1)
    assert by_round[2]["eval_loss"] == pytest.approx(6.1) and by_round[1]["eval_loss"] is None
    assert status["totals"]["tokens"] == 3072 * rounds
    assert status["totals"]["bytes_sent"] == 2 * 1000 * rounds
    assert status["progress"]["round"] == rounds and status["progress"]["max_rounds"] == 10
    monitor.signal(signal.SIGTERM)
    assert monitor.wait(timeout_s=30) == 0, monitor.log()[-3000:]
    if HAVE_WANDB:  # the settled rounds (all but the newest) went to wandb
        [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
        assert b"swarm/loss" in run_file.read_bytes()


@needs_chromium
def test_dashboard_page_renders_peers_and_loss_in_a_browser(local_swarm, tmp_path):
    """The bootstrap node's --dashboard-port serves the same monitor; a real browser shows its peers and curve."""
    rounds = 6
    node = Proc(
        "bootstrap",
        [
            "-m",
            "dht_bootstrap",
            "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0",
            "--dashboard-port",
            "0",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-run-id",
            RUN_ID,
        ],
        tmp_path,
    )
    local_swarm.procs.append(node)
    url = dashboard_url(node)
    node_maddrs = re.findall(r"--initial-peers (\S+)", node.log())
    assert node_maddrs, node.log()
    page_peers = []
    try:
        page_peers = [RecordPublisher(node_maddrs, run_id=RUN_ID, fingerprint=FINGERPRINT) for _ in range(2)]
        publish_run(page_peers, rounds)

        def complete():
            refresh_progress(page_peers, rounds)
            status = get_status(url)
            return status if len(status["peers"]) == 2 and len(status["rounds"]) == rounds else None

        wait_for(complete, timeout_s=60, what="the dashboard's status", interval_s=0.5)
        refresh_progress(page_peers, rounds)
        dom = browse(url, tmp_path, "dashboard")
        for publisher in page_peers:
            assert f'data-peer-id="{publisher.peer_id}"' in dom
        assert re.search(rf'id="loss-chart"[^>]*data-points="{rounds}"', dom), (
            "the loss chart has every round"
        )
        assert "<canvas" in dom and 'class="badge live"' in dom
    finally:
        for publisher in page_peers:
            publisher.shutdown()


def test_bootstrap_node_imports_only_the_shared_checks_and_networking_without_the_dashboard():
    """Without --dashboard-port the node loads from peer/ only what it shares with peers and needs itself: the checks
    of what the user typed (preflight.py) and the reachability checks it answers and relays it serves
    (reachability.py, relay.py; hivemind and the standard library only). Never the peer's training code."""
    code = (
        "import sys, dht_bootstrap.__main__ as cli, dht_bootstrap.node; "
        "cli.build_parser().parse_args([]); "
        "print(sorted(m for m in sys.modules if m == 'peer' or m.startswith('peer.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=child_env(), check=True
    )
    assert out.stdout.strip() == "['peer', 'peer.preflight', 'peer.reachability', 'peer.relay']"


def test_server_serves_page_assets_and_strict_json(tmp_path):
    from peer.dashboard.server import DashboardError, DashboardServer

    server = DashboardServer(
        lambda: {"loss": float("nan"), "rows": [1.5, float("inf")]}, host="127.0.0.1", port=0
    )
    port = server.start()
    try:
        base = f"http://127.0.0.1:{port}/"
        assert json.loads(urllib.request.urlopen(base + "api/status", timeout=10).read()) == {
            "loss": None,
            "rows": [1.5, None],
        }
        page = urllib.request.urlopen(base, timeout=10).read().decode()
        for asset in re.findall(r'(?:src|href)="/(static/[^"]+)"', page):
            assert urllib.request.urlopen(base + asset, timeout=10).status == 200
        assert "uPlot" in page
        busy = DashboardServer(dict, host="127.0.0.1", port=port)
        with pytest.raises(DashboardError, match=f"port {port}"):
            busy.start()
    finally:
        server.stop()


def expected_round(records_by_peer: dict[str, dict[int, dict]], round_index: int) -> tuple[float, int]:
    """The token-weighted loss and the tokens of a round, computed from the peers' metrics files."""
    rows = [by_round[round_index] for by_round in records_by_peer.values() if round_index in by_round]
    tokens = sum(r["round_tokens"] for r in rows)
    return sum(r["loss"] * r["round_tokens"] for r in rows) / tokens, tokens


@pytest.mark.timeout(420)
def test_live_swarm_dashboard_matches_the_metrics_files(local_swarm, tmp_path):
    run_id = "live"
    local_swarm.start_bootstrap(
        extra=["--dashboard-port", "0", "--dashboard-host", "127.0.0.1", "--dashboard-run-id", run_id]
    )
    url = dashboard_url(local_swarm.bootstrap)
    common = ["--run-id", run_id, "--wait-for-peers", "3", "--eval-every", "2"]
    peers = [local_swarm.start_peer(f"peer{i}", *common) for i in range(3)]
    local_swarm.wait_rounds(peers, 4, timeout_s=300)

    def settled():  # every live peer's latest summary has reached the monitor
        status = get_status(url)
        shown = {p["peer_id"]: p["round"] for p in status["peers"]}
        files = {p.records()[0]["peer_id"]: p.records()[-1]["round"] for p in peers}
        return status if len(shown) == 3 and all((shown.get(pid) or 0) >= 4 for pid in files) else None

    status = wait_for(
        settled, timeout_s=60, what="three live peers past round 4 on the dashboard", interval_s=0.5
    )
    records = {p.records()[0]["peer_id"]: {r["round"]: r for r in p.records()} for p in peers}
    assert {row["peer_id"] for row in status["peers"]} == set(records)  # the metrics files' peer ids
    for row in status["peers"]:
        mine = records[row["peer_id"]]
        record = mine[row["round"]]
        assert row["loss"] == pytest.approx(record["loss"]) and row["tokens"] == record["tokens"]
        assert row["last_hash"] == record["global_params_sha256"]
        assert (row["failed_rounds"], row["resyncs"]) == (record["failed_rounds"], record["resyncs"])
        assert row["bytes_sent"] == sum(r["bytes_sent"] for rnd, r in mine.items() if rnd <= row["round"])
        assert row["reachability"] == "direct" and row["device"] == "cpu"
    by_round = {row["round"]: row for row in status["rounds"]}
    for round_index in range(1, 5):
        row = by_round[round_index]
        if row["peers"] == 3:  # every peer's loss for the round has arrived
            loss, tokens = expected_round(records, round_index)
            assert row["loss"] == pytest.approx(loss) and row["tokens"] == tokens
        hashes = {by[round_index]["global_params_sha256"] for by in records.values() if round_index in by}
        assert row["hash_agreeing"] == row["hash_peers"] == 3 and {row["majority_hash"]} == hashes
    assert by_round[2]["eval_loss"] is not None and by_round[1]["eval_loss"] is None
    assert status["totals"]["tokens"] >= sum(by[4]["tokens"] for by in records.values())

    if CHROMIUM is not None:
        dom = browse(url, tmp_path, "dashboard-live")
        for peer_id in records:
            assert f'data-peer-id="{peer_id}"' in dom
        points = int(re.search(r'id="loss-chart"[^>]*data-points="(\d+)"', dom).group(1))
        assert points >= 4
        if os.environ.get(
            "DILOCO_UPDATE_DOCS"
        ):  # README's screenshot: DILOCO_UPDATE_DOCS=1 pytest -k live_swarm
            shutil.copy(tmp_path / "dashboard-live.png", Path(__file__).parents[2] / "docs" / "dashboard.png")
    for peer in peers:
        peer.signal(signal.SIGTERM)
    for peer in peers:
        assert peer.wait(timeout_s=60) == 0
