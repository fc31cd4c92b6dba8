"""The checks run before any heavy work (peer/preflight.py), without network: multiaddrs, files, the tokenizer and
dataset names, and that the module stays light enough for the bootstrap node to import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from peer import preflight
from peer.preflight import PreflightError

PEER_ID = "QmSoLPppuBtQSGwKDZT2M73ULpjvfd3aZ6ha4oFGL1KrGM"


def test_importing_preflight_does_not_import_torch_or_hivemind():
    code = (
        "import sys; from peer import preflight; preflight.parse_maddr('/ip4/1.2.3.4/tcp/5', flag='x'); "
        "print(sorted(m for m in ('torch', 'hivemind', 'transformers', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nonsense",
        "/ip4/1.2.3.300/tcp/1",
        "/ip4/1.2.3.4/tcp/65536",
        "/ip4/1.2.3.4/tcp",
        "/ip4/1.2.3.4/tcp/x",
    ],
)
def test_a_malformed_multiaddr_is_a_usage_error_naming_the_flag(text):
    with pytest.raises(PreflightError, match="--host-maddrs: .* is not a valid multiaddr") as error:
        preflight.check_host_maddrs([text])
    assert error.value.exit_code == 2 and "\n" not in str(error.value)


def test_listen_addresses_need_an_address_and_a_port():
    preflight.check_host_maddrs(["/ip4/0.0.0.0/tcp/0", "/ip6/::/tcp/31337", "/ip4/0.0.0.0/udp/0/quic"])
    for text in ("/ip4/0.0.0.0", "/tcp/5", f"/p2p/{PEER_ID}"):
        with pytest.raises(PreflightError, match="needs an address and a port"):
            preflight.check_host_maddrs([text])
    with pytest.raises(PreflightError, match="at least one"):
        preflight.check_host_maddrs([])


def test_announced_addresses_need_a_real_port():
    preflight.check_announce_maddrs(["/ip4/203.0.113.7/tcp/31337"])
    for text in ("/ip4/203.0.113.7/tcp/0", "/ip4/203.0.113.7/udp/0/quic"):
        with pytest.raises(PreflightError, match="port 0 cannot be announced"):
            preflight.check_announce_maddrs([text])


def test_initial_peers_need_an_address_and_a_peer_id():
    preflight.check_peer_maddrs(
        [f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID}", f"/dns4/example.org/tcp/1/p2p/{PEER_ID}"]
    )
    for text in ("/ip4/127.0.0.1/tcp/1", f"/p2p/{PEER_ID}"):
        with pytest.raises(PreflightError, match="must hold an address and the peer id"):
            preflight.check_peer_maddrs([text])
    with pytest.raises(PreflightError, match="not a valid multiaddr"):
        preflight.check_peer_maddrs(["/ip4/127.0.0.1/tcp/1/p2p/not-a-peer-id"])


def test_tcp_addresses_and_fixed_ports():
    assert preflight.tcp_address(f"/ip4/127.0.0.1/tcp/5/p2p/{PEER_ID}").port == 5
    assert preflight.tcp_address("/dns/example.org/tcp/7").host == "example.org"
    assert preflight.tcp_address("/ip4/127.0.0.1/udp/5/quic") is None
    assert preflight.fixed_tcp_ports(
        ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/tcp/31337", "/ip6/::/udp/9/quic"]
    ) == [31337]


def test_a_writable_directory_is_created_and_left_empty(tmp_path: Path):
    folder = tmp_path / "a" / "b"
    preflight.check_writable_dir(folder, flag="--checkpoint-dir")
    assert folder.is_dir() and not list(folder.iterdir())


def test_paths_that_cannot_be_written(tmp_path: Path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(PreflightError, match="--checkpoint-dir .* is not a directory"):
        preflight.check_writable_dir(a_file, flag="--checkpoint-dir")
    with pytest.raises(PreflightError, match="cannot create the directory"):
        preflight.check_writable_dir(a_file / "sub", flag="--checkpoint-dir")
    with pytest.raises(PreflightError, match="is a directory"):
        preflight.check_writable_file(tmp_path, flag="--metrics-file")
    with pytest.raises(PreflightError, match="does not exist"):
        preflight.check_writable_file(tmp_path / "missing" / "m.txt", flag="--maddrs-file")
    with pytest.raises(PreflightError, match="is a directory"):
        preflight.check_identity_path(tmp_path)


def test_an_existing_file_is_checked_without_being_changed(tmp_path: Path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"round": 1}\n')
    preflight.check_writable_file(metrics, flag="--metrics-file")
    preflight.check_writable_file(
        tmp_path / "new" / "metrics.jsonl", flag="--metrics-file", create_parent=True
    )
    assert metrics.read_text() == '{"round": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "new"]
    assert not list((tmp_path / "new").iterdir())


def test_local_tokenizers_and_datasets(tmp_path: Path):
    preflight.check_tokenizer("embedded")
    preflight.check_dataset("embedded")
    with pytest.raises(PreflightError, match="--tokenizer .* no such file"):
        preflight.check_tokenizer(str(tmp_path / "missing.json"))
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text("{ not json")
    with pytest.raises(PreflightError, match="--tokenizer .* cannot be loaded"):
        preflight.check_tokenizer(str(garbage))
    with pytest.raises(PreflightError, match="--dataset .* no such file"):
        preflight.check_dataset(str(tmp_path / "missing.jsonl"))
    text = tmp_path / "corpus.txt"
    text.write_text("some text")
    preflight.check_dataset(str(text))
    preflight.check_dataset(
        "some-org/some-dataset"
    )  # the hub answers (assumed): the loader will check the name


def test_every_message_is_one_line():
    assert str(PreflightError("a\nb   c\td")) == "a b c d"
    assert preflight.one_line(ValueError("x\n\ny")) == "x y"


def test_a_setting_that_is_not_a_finite_number_names_its_flag():
    from peer.config import InnerConfig, RunConfig, SwarmConfig

    preflight.check_finite_numbers(RunConfig())
    with pytest.raises(PreflightError, match="--weight-decay must be a finite number, got nan") as error:
        preflight.check_finite_numbers(RunConfig(inner=InnerConfig(weight_decay=float("nan"))))
    assert error.value.exit_code == 2
    with pytest.raises(PreflightError, match="--matchmaking-s must be a finite number, got inf"):
        preflight.check_finite_numbers(RunConfig(swarm=SwarmConfig(matchmaking_s=float("inf"))))


def test_dataset_globs_and_file_names_are_local(tmp_path: Path):
    (tmp_path / "part-0.parquet").write_bytes(b"PAR1")
    preflight.check_dataset(str(tmp_path / "*.parquet"))
    with pytest.raises(PreflightError, match="no file matches"):
        preflight.check_dataset(str(tmp_path / "*.jsonl"))
    with pytest.raises(PreflightError, match="no such file"):
        preflight.check_dataset("corpus.jsonl")  # a relative file name, not a hub id
