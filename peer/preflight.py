"""Checks of what the user typed, run before any heavy work (torch, hivemind, the model, the data, the DHT): each
problem becomes one PreflightError whose message is the line the CLI prints. Shared by the peer and the bootstrap
node, so its module level needs nothing but the standard library."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import importlib.util
import logging
import math
import os
import socket
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

REACHABLE_TIMEOUT_S = 5.0
"""How long to wait for a TCP connection to an initial peer (or the Hugging Face hub) before calling it unreachable."""
ADDRESS_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr")
EXAMPLE_LISTEN = "/ip4/0.0.0.0/tcp/31337"
EXAMPLE_PEER = "/ip4/203.0.113.7/tcp/31337/p2p/QmPeerIdOfTheNode"


class PreflightError(ValueError):
    """A problem with the user's input or environment, found before starting; the message is one line."""

    def __init__(self, message: str, *, exit_code: int = 1):
        super().__init__(one_line(message))
        self.exit_code = exit_code
        """2 for a malformed value (like a usage error), 1 for an environment problem (busy port, unreachable peer)."""


def one_line(text: object) -> str:
    """Any message as one line: libraries' errors often span several."""
    return " ".join(str(text).split())


# ---- multiaddrs -----------------------------------------------------------------------------------------------
_MULTIADDR_MODULE = "_hivemind_multiaddr"


def multiaddr_class() -> type:
    """The multiaddr parser hivemind itself uses (its vendored copy of py-multiaddr), so that what passes here
    passes hivemind. It is loaded on its own: importing it through `hivemind` imports torch first, which takes
    tens of seconds on a loaded machine before a typo could be reported."""
    if "hivemind.utils.multiaddr" in sys.modules:
        return sys.modules["hivemind.utils.multiaddr"].Multiaddr
    if _MULTIADDR_MODULE not in sys.modules:
        hivemind_spec = importlib.util.find_spec("hivemind")  # finds the package without importing it
        if hivemind_spec is None or not hivemind_spec.submodule_search_locations:
            raise PreflightError("hivemind is not installed: pip install hivemind==1.1.12")
        folder = Path(hivemind_spec.submodule_search_locations[0]) / "utils" / "multiaddr"
        spec = importlib.util.spec_from_file_location(
            _MULTIADDR_MODULE, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        if spec is None or spec.loader is None:  # another hivemind layout: take the slow path
            from hivemind.utils.multiaddr import Multiaddr

            return Multiaddr
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MULTIADDR_MODULE] = module  # its submodules import each other relative to this name
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[_MULTIADDR_MODULE]
            raise
    return sys.modules[_MULTIADDR_MODULE].Multiaddr


def parse_maddr(text: str, *, flag: str, example: str = EXAMPLE_LISTEN) -> Any:
    """A parsed multiaddr, or a PreflightError naming the flag and showing the expected form."""
    try:
        return multiaddr_class()(text)
    except Exception as e:  # the multiaddr package raises several unrelated exception types
        raise PreflightError(
            f"{flag}: {text!r} is not a valid multiaddr ({e}); expected e.g. {example}", exit_code=2
        ) from None


def _protocols(maddr: Any) -> list[str]:
    return [protocol.name for protocol in maddr.protocols()]


def check_host_maddrs(texts: Sequence[str], *, flag: str = "--host-maddrs") -> None:
    """Listen addresses: valid multiaddrs with an IP (or name) and a TCP or UDP port."""
    if not texts:
        raise PreflightError(f"{flag} needs at least one multiaddr, e.g. {EXAMPLE_LISTEN}", exit_code=2)
    for text in texts:
        names = _protocols(parse_maddr(text, flag=flag))
        if not any(name in ADDRESS_PROTOCOLS for name in names) or not {"tcp", "udp"} & set(names):
            raise PreflightError(
                f"{flag}: {text!r} needs an address and a port to listen on, e.g. {EXAMPLE_LISTEN}",
                exit_code=2,
            )


def check_announce_maddrs(texts: Sequence[str], *, flag: str = "--announce-maddrs") -> None:
    """Public addresses: valid multiaddrs with a real port (port 0 means 'any', which nobody can dial)."""
    for text in texts:
        maddr = parse_maddr(text, flag=flag, example="/ip4/PUBLIC_IP/tcp/PORT")
        names = _protocols(maddr)
        for proto in ("tcp", "udp"):
            if proto in names and maddr.value_for_protocol(proto) == "0":
                raise PreflightError(
                    f"{flag} {text}: port 0 cannot be announced, give the real public port", exit_code=2
                )


def check_peer_maddrs(texts: Sequence[str], *, flag: str = "--initial-peers") -> None:
    """Addresses of other peers: valid multiaddrs with an address and the peer's id (/p2p/...), as printed by
    the bootstrap node or a peer that started a swarm."""
    for text in texts:
        names = _protocols(parse_maddr(text, flag=flag, example=EXAMPLE_PEER))
        if "p2p" not in names or not any(name in ADDRESS_PROTOCOLS for name in names):
            raise PreflightError(
                f"{flag}: {text!r} must hold an address and the peer id, e.g. {EXAMPLE_PEER}: "
                "copy the line the bootstrap node (or the first peer) printed",
                exit_code=2,
            )


@dataclass(frozen=True)
class TcpAddress:
    """The TCP endpoint of a multiaddr."""

    maddr: str
    host: str
    port: int
    family: int


def tcp_address(text: str) -> TcpAddress | None:
    """The /ip4|ip6|dns*/HOST/tcp/PORT part of a multiaddr; None if it has none (QUIC, a bare peer id)."""
    maddr = multiaddr_class()(text)
    names = _protocols(maddr)
    if "tcp" not in names:
        return None
    families = {
        "ip4": socket.AF_INET,
        "dns4": socket.AF_INET,
        "ip6": socket.AF_INET6,
        "dns6": socket.AF_INET6,
    }
    for name in ("ip4", "ip6", "dns4", "dns6", "dns"):
        if name in names:
            host = maddr.value_for_protocol(name)
            return TcpAddress(text, host, int(maddr.value_for_protocol("tcp")), families.get(name, 0))
    return None


def check_ports_free(host_maddrs: Iterable[str], *, flag: str = "--host-maddrs") -> None:
    """Every TCP listen address can be bound: a fixed port no other process listens on, an address of this machine.

    go-libp2p listens with SO_REUSEPORT, so a second peer on a busy port would start "fine" and the kernel would
    split incoming connections between the two; binding without SO_REUSEPORT here fails instead, even against a
    daemon that holds the port with it."""
    for text in host_maddrs:
        address = tcp_address(text)
        if address is None or not address.family:
            continue  # a DNS name or QUIC: left to the daemon
        with socket.socket(address.family, socket.SOCK_STREAM) as sock:
            # SO_REUSEADDR as Go sets it, so sockets in TIME_WAIT from our previous run do not count as busy.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address.host, address.port))
            except OSError as e:
                what = "port 0 (any port)" if address.port == 0 else f"port {address.port}"
                hint = (
                    "stop the other process or choose another port"
                    if e.errno == 98  # EADDRINUSE
                    else "use an address of this machine, or 0.0.0.0 for all of them"
                )
                raise PreflightError(
                    f"{flag} {text}: cannot listen on {address.host} {what} ({e.strerror}); {hint}"
                ) from None


def check_listen_port(host: str, port: int, *, flag: str) -> None:
    """A TCP server of ours (the dashboard) can listen on host:port (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does
        try:
            sock.bind((host, port))
        except OSError as e:
            hint = "stop the other process or choose another port" if e.errno == 98 else "check the address"
            raise PreflightError(
                f"{flag} {port}: cannot listen on {host} port {port} ({e.strerror}); {hint}"
            ) from None


def fixed_tcp_ports(host_maddrs: Iterable[str]) -> list[int]:
    """The non-zero TCP ports among the listen addresses."""
    ports = []
    for text in host_maddrs:
        address = tcp_address(text)
        if address is not None and address.port:
            ports.append(address.port)
    return ports


def _connect(host: str, port: int, timeout_s: float) -> str | None:
    """None if a TCP connection opens, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except TimeoutError:
        return f"no answer in {timeout_s:g} s"
    except socket.gaierror as e:
        return f"cannot resolve {host}: {e.strerror}"
    except OSError as e:
        return e.strerror or type(e).__name__


def check_reachable(
    initial_peers: Sequence[str], *, flag: str = "--initial-peers", timeout_s: float = REACHABLE_TIMEOUT_S
) -> None:
    """At least one initial peer accepts a TCP connection; otherwise say what was tried and what to check. Peers
    without a TCP address (QUIC, /dnsaddr) cannot be checked this cheaply and count as reachable."""
    if not initial_peers:
        return
    addresses = [tcp_address(text) for text in initial_peers]
    if any(address is None for address in addresses):
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(addresses))) as pool:
        failures = list(pool.map(lambda a: _connect(a.host, a.port, timeout_s), addresses))
    if any(failure is None for failure in failures):
        return
    tried = "; ".join(f"{a.maddr} ({failure})" for a, failure in zip(addresses, failures, strict=True))
    raise PreflightError(
        f"none of the {flag} answered: {tried}. Check that the bootstrap node or peer is running, that this is "
        "its current address (one started without --identity-path and a fixed port gets a new one at every "
        "start: copy the line it printed), and that no firewall blocks the port"
    )


# ---- files -----------------------------------------------------------------------------------------------------
def _probe_directory(folder: Path, *, flag: str, what: str) -> None:
    """Create and remove a file in `folder`: the only test of writability that also holds for root and read-only
    mounts."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".preflight-", suffix=".tmp")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise PreflightError(f"{flag} {what}: cannot write in {folder} ({e.strerror})") from None


def check_writable_dir(path: str | os.PathLike, *, flag: str) -> None:
    """A directory we will write files into (created if missing, as the writer would)."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise PreflightError(f"{flag} {path} is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreflightError(f"{flag} {path}: cannot create the directory ({e.strerror})") from None
    _probe_directory(folder, flag=flag, what=str(path))


def check_writable_file(path: str | os.PathLike, *, flag: str, create_parent: bool = False) -> None:
    """A file we will append to or replace (through a temporary file beside it): not a directory, in a directory we
    can write in (created if missing when the writer creates it too), and writable itself if it exists."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise PreflightError(f"{flag} {path} is a directory; give a file path")
    parent = file.parent
    if not parent.is_dir():
        if parent.exists():
            raise PreflightError(f"{flag} {path}: {parent} is not a directory")
        if not create_parent:
            raise PreflightError(f"{flag} {path}: directory {parent} does not exist; create it first")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PreflightError(f"{flag} {path}: cannot create directory {parent} ({e.strerror})") from None
    _probe_directory(parent, flag=flag, what=str(path))
    if file.exists():
        try:
            with open(file, "ab"):
                pass
        except OSError as e:
            raise PreflightError(f"{flag} {path} is not writable ({e.strerror})") from None


def check_identity_path(path: str | os.PathLike, *, flag: str = "--identity-path") -> None:
    """A private key file to read, or to create on the first start."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise PreflightError(f"{flag} {path} is a directory; give a file path for the private key")
    if file.exists():
        try:
            with open(file, "rb"):
                pass
        except OSError as e:
            raise PreflightError(
                f"{flag} {path} cannot be read ({e.strerror}); fix its permissions"
            ) from None
    else:
        check_writable_file(file, flag=flag)


# ---- tokenizer and dataset -------------------------------------------------------------------------------------
LOCAL_SUFFIXES = (".json", ".jsonl", ".txt", ".md", ".csv", ".parquet", ".gz", ".arrow")
"""Names ending like this are files, never Hugging Face hub ids."""


def is_local_spec(spec: str) -> bool:
    """A tokenizer or dataset named by a path (or glob pattern) rather than a Hugging Face hub id."""
    return (
        spec.startswith(("/", "./", "../", "~"))
        or spec.lower().endswith(LOCAL_SUFFIXES)
        or any(ch in spec for ch in "*?[")
        or os.path.exists(os.path.expanduser(spec))
    )


def local_path_exists(spec: str) -> bool:
    """A local path (or a glob pattern that matches something) exists on this machine."""
    path = os.path.expanduser(spec)
    return bool(glob.glob(path)) if any(ch in spec for ch in "*?[") else os.path.exists(path)


def hub_unreachable_reason(*, timeout_s: float = REACHABLE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be used from here (None: it answers, or a proxy is configured and will)."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy decides; a direct connection would say nothing
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    failure = _connect(host, port, timeout_s)
    return None if failure is None else f"{host}: {failure}"


def use_hub_offline_if_unreachable(*, timeout_s: float = REACHABLE_TIMEOUT_S) -> str | None:
    """If the hub cannot be reached, make every Hugging Face library in this process read its local cache only
    (HF_HUB_OFFLINE=1) instead of retrying the network for minutes; returns why, or None if it is reachable.
    Must run before huggingface_hub is imported (it reads the variable once)."""
    reason = hub_unreachable_reason(timeout_s=timeout_s)
    if reason is not None:
        os.environ["HF_HUB_OFFLINE"] = "1"
    return reason


def check_tokenizer(spec: str, *, hub_unreachable: str | None = None) -> None:
    """The tokenizer loads (with peer.data's own loader); `hub_unreachable` says why the hub is not available."""
    if spec == "embedded":
        return  # shipped with the package (tests/unit/test_assets.py)
    if is_local_spec(spec) and not os.path.exists(os.path.expanduser(spec)):
        raise PreflightError(f"--tokenizer {spec}: no such file or directory")
    from peer.data import Tokenizer  # imports torch: only once every cheap check has passed

    try:
        Tokenizer(spec)
    except Exception as e:  # tokenizers, transformers and the hub raise many types for the same problem
        if hub_unreachable is not None and not is_local_spec(spec):
            raise PreflightError(
                f"--tokenizer {spec} is not a local file or directory and not in the Hugging Face cache, and the "
                f"hub cannot be reached ({hub_unreachable}): give a tokenizer.json file or a saved tokenizer "
                "directory, or run once where the hub is reachable so that it is cached"
            ) from None
        raise PreflightError(
            f"--tokenizer {spec} cannot be loaded ({type(e).__name__}: {one_line(e)[:300]}); give 'embedded', "
            "a tokenizer.json file, a saved tokenizer directory or a Hugging Face tokenizer name"
        ) from None


def check_dataset(
    dataset: str, *, dataset_config: str | None = None, hub_unreachable: str | None = None
) -> None:
    """A local dataset exists and is readable; a hub dataset resolves (from the local cache if the hub cannot be
    reached). Reading and checking its contents is peer.data's job, with its own clear errors."""
    if dataset == "embedded":
        return
    path = Path(dataset).expanduser()
    if any(ch in dataset for ch in "*?["):  # a glob pattern of local files
        if not glob.glob(str(path)):
            raise PreflightError(f"--dataset {dataset}: no file matches")
        return
    if is_local_spec(dataset):
        if not path.exists():
            raise PreflightError(f"--dataset {dataset}: no such file or directory")
        try:
            if path.is_dir():
                os.listdir(path)
            else:
                with open(path, "rb") as file:
                    file.read(1)
        except OSError as e:
            raise PreflightError(f"--dataset {dataset} cannot be read ({e.strerror})") from None
        return
    if hub_unreachable is None:
        return  # the hub answers: the loader will say if the name is wrong
    name, _, subset = dataset.partition(":")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.load_dataset_builder(name, dataset_config or subset or None)
    except Exception:  # datasets raises many types for a dataset it cannot find
        raise PreflightError(
            f"--dataset {dataset} is not a local file or directory, and the Hugging Face hub cannot be reached "
            f"({hub_unreachable}): save it with datasets' save_to_disk (or as parquet/jsonl files) where the hub "
            "is reachable and pass that path"
        ) from None


def _names_hub_resource(spec: str) -> bool:
    return spec != "embedded" and not is_local_spec(spec)


# ---- settings ---------------------------------------------------------------------------------------------------
def _flag_names() -> dict[tuple[str | None, str], str]:
    """(config section, field name) -> the flag that sets it, from peer.cli's table."""
    from peer.cli import FLAGS

    names = {}
    for key, flag in FLAGS.items():
        section, name = flag if isinstance(flag, tuple) else (flag.section, flag.field.name)
        names[section, name] = "--" + key.replace("_", "-")
    return names


def check_finite_numbers(config: Any) -> None:
    """No setting is NaN or infinite: TOML and float() accept both, and the range checks of peer/config.py let
    some through (NaN fails every comparison), though no setting means anything with them."""
    flags = _flag_names()
    sections = [(None, config)] + [
        (field.name, getattr(config, field.name))
        for field in dataclasses.fields(config)
        if dataclasses.is_dataclass(getattr(config, field.name))
    ]
    for section, settings in sections:
        for field in dataclasses.fields(settings):
            value = getattr(settings, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                flag = flags.get((section, field.name), f"{section + '.' if section else ''}{field.name}")
                raise PreflightError(f"{flag} must be a finite number, got {value}", exit_code=2)


# ---- everything a command checks before it starts --------------------------------------------------------------
def check_peer(config: Any) -> None:
    """Every check of a peer's settings (a peer.config.RunConfig), cheapest first; raises the first PreflightError."""
    check_peer_machine(config)
    check_workload(config)


def check_peer_machine(config: Any) -> None:
    """The checks of this machine's settings: addresses, files, ports, the initial peers answer."""
    swarm = config.swarm
    check_host_maddrs(swarm.host_maddrs)
    check_announce_maddrs(swarm.announce_maddrs)
    check_peer_maddrs(swarm.initial_peers)
    if swarm.identity_path:
        check_identity_path(swarm.identity_path)
    if swarm.maddrs_file:
        check_writable_file(swarm.maddrs_file, flag="--maddrs-file")
    if config.metrics_file:
        check_writable_file(config.metrics_file, flag="--metrics-file", create_parent=True)
    if config.checkpoint_dir:
        check_writable_dir(config.checkpoint_dir, flag="--checkpoint-dir")
    check_ports_free(swarm.host_maddrs)
    check_reachable(swarm.initial_peers)


def check_workload(config: Any) -> None:
    """The checks of what a run trains on (also for the in-process simulation): numbers, dataset, tokenizer."""
    check_finite_numbers(config)
    data = config.data
    hub_unreachable = None
    if _names_hub_resource(data.tokenizer) or _names_hub_resource(data.dataset):
        hub_unreachable = use_hub_offline_if_unreachable()
    check_dataset(
        data.dataset, dataset_config=getattr(data, "dataset_config", None), hub_unreachable=hub_unreachable
    )
    check_tokenizer(data.tokenizer, hub_unreachable=hub_unreachable)
    if hub_unreachable is not None and "HF_HUB_OFFLINE" not in hub_unreachable:
        logger.warning(
            f"the Hugging Face hub cannot be reached ({hub_unreachable}); using the local cache only"
        )


def check_bootstrap(
    *,
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str] = (),
    initial_peers: Sequence[str] = (),
    identity_path: str | os.PathLike | None = None,
    maddrs_file: str | os.PathLike | None = None,
    dashboard_host: str = "0.0.0.0",
    dashboard_port: int | None = None,
) -> None:
    """Every check of the bootstrap node's flags, cheapest first; raises the first PreflightError."""
    check_host_maddrs(host_maddrs)
    check_announce_maddrs(announce_maddrs)
    check_peer_maddrs(initial_peers)
    if identity_path is not None:
        check_identity_path(identity_path)
    if maddrs_file is not None:
        check_writable_file(maddrs_file, flag="--maddrs-file")
    check_ports_free(host_maddrs)
    if dashboard_port is not None:
        check_listen_port(dashboard_host, dashboard_port, flag="--dashboard-port")
    check_reachable(initial_peers)


def check_monitor(*, initial_peers: Sequence[str], host: str, port: int) -> None:
    """Every check of the monitor's flags (python -m peer.monitor), cheapest first."""
    check_peer_maddrs(initial_peers)
    check_listen_port(host, port, flag="--port")
    check_reachable(initial_peers)
