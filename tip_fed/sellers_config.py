"""``sellers.toml``: which sellers ``tip-fed value`` values, and over which runtime.

Parsing is light (no torch, no TenSEAL, no grpcio, no Flower). Unknown keys are errors, every
message names the key and the fix, and paths are relative to the TOML file.

sellers.toml::

    runtime = "grpc"                      # or "inprocess", "flower-simulation", "flower-deployment"
    max-samples = 10000                   # optional: largest seller (default: asked / counted)
    [[sellers]]
    id = "clinic-a"
    endpoint = "10.0.0.5:50051"           # grpc: where 'tip-fed seller serve' listens
    # ca = "clinic-a-ca.crt"              # grpc, optional: the only CA trusted for this seller
    # data = "clinic-a.csv"               # inprocess / flower-*: the seller's records (.safetensors,
    #                                     #   .csv, .parquet, .jsonl, .txt); one SuperNode per file
    # node-id = 4711                      # flower-deployment with [superlink]: its registered node
    [tls]                                 # grpc
    ca = "tls/ca.crt"                     # CA of the sellers' server certificates
    cert = "tls/buyer.crt"                # client certificate and key (mutual TLS)
    key = "tls/buyer.key"
    # bind-seller-id = true               # a seller's certificate must name its id
    # insecure = true                     # plaintext gRPC (trusted networks, tests)
    [grpc]
    timeout-s = 600                       # deadline of one seller's answer; retries, max-message-mb
    [flower]                              # flower-*: timeout-s, wave-size, min-sellers, node-wait-s, num-cpus
    [superlink]                           # flower-deployment on an existing SuperLink (else a local one)
    address = "127.0.0.1:9093"            # the SuperLink's port ('flwr run' connects there)
    root-certificates = "certs/ca.crt"    # or insecure = true
    publisher-key = "keys/publisher"      # the Ed25519 key the sellers' SuperNodes trust
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tip_fed.config import RUNTIMES, FlowerConfig, GrpcConfig, config_from_dict
from tip_fed.errors import ConfigError
from tip_fed.toml_files import (
    check_keys,
    existing_path,
    flag,
    positive_int,
    read_toml,
    string,
    table,
)

#: Seller data files by extension: tensors, or raw records the buyer's [format] encodes.
DATA_SUFFIXES = (".safetensors", ".csv", ".parquet", ".jsonl", ".txt")
#: Runtimes that read each seller's data file here (the others reach sellers where they run).
FILE_RUNTIMES = ("inprocess", "flower-simulation")
DOC = "the tip_fed.sellers_config docstring"


@dataclass(frozen=True)
class SellerEntry:
    """One seller of ``sellers.toml``: its id and where to reach it (endpoint, node) or its data file."""

    id: str
    endpoint: str | None = None
    data: Path | None = None
    ca: Path | None = None
    node_id: int | None = None


@dataclass(frozen=True)
class ClientTLSFiles:
    """The buyer's TLS material for gRPC sellers (or ``insecure``)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False
    bind_seller_id: bool = False


@dataclass(frozen=True)
class SuperLinkFiles:
    """An existing SuperLink: its address, how to trust it, and the key that signs the buyer's app."""

    address: str
    publisher_key: Path
    root_certificates: Path | None = None
    insecure: bool = False


@dataclass(frozen=True)
class SellersConfig:
    """A parsed ``sellers.toml``."""

    runtime: str
    sellers: tuple[SellerEntry, ...]
    tls: ClientTLSFiles
    grpc: GrpcConfig
    max_samples: int | None = None
    source: Path | None = None
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    superlink: SuperLinkFiles | None = None

    def files(self) -> dict[str, Path]:
        """seller id -> data file (every seller of a file runtime has one)."""
        return {s.id: s.data for s in self.sellers if s.data is not None}


def data_file(base: Path, value: Any, key: str, name: str) -> Path:
    """A data file named in a TOML file: it exists and its extension says how to read it."""
    path = existing_path(base, value, key, name)
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise ConfigError(f"{name}: {key} = {value!r} has extension {path.suffix!r}; data files are read by "
                          f"extension: {', '.join(DATA_SUFFIXES)}")
    return path


def load_sellers_config(path: str | Path) -> SellersConfig:
    """Parse and check ``sellers.toml`` (runtime, unique seller ids, endpoints, data files or nodes, TLS files)."""
    source, data = read_toml(path, "sellers config", f"write one (see {DOC})")
    name, base = source.name, source.parent
    check_keys(data, ("runtime", "sellers", "tls", "grpc", "flower", "superlink", "max-samples"), "", name)
    runtime = data.get("runtime", "grpc")
    if runtime not in RUNTIMES:
        raise ConfigError(f"{name}: runtime = {runtime!r} is unknown; use one of {', '.join(RUNTIMES)}")
    max_samples = positive_int(data, "max-samples", "", name, "the largest seller's record count")
    superlink = _superlink(table(data, "superlink", name, required=False), base, name, runtime)
    entries = data.get("sellers")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, Mapping) for e in entries):
        raise ConfigError(f"{name}: list the sellers as [[sellers]] tables, each with an id and an endpoint, "
                          "data or node-id")
    sellers: list[SellerEntry] = []
    for i, entry in enumerate(entries):
        sellers.append(_seller(entry, f"sellers[{i}].", base, name, runtime, superlink is not None))
        if sellers[-1].id in {s.id for s in sellers[:-1]}:
            raise ConfigError(f"{name}: seller id {sellers[-1].id!r} is listed twice; seller ids must be unique")
    tls = _tls(table(data, "tls", name, required=False), base, name, runtime, all(s.ca for s in sellers))
    try:
        cfg = config_from_dict({"grpc": table(data, "grpc", name, required=False),
                                "flower": table(data, "flower", name, required=False)})
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    if superlink is not None and max_samples is None:
        raise ConfigError(f"{name}: with [superlink] the sellers' data is not here to count; set max-samples = N "
                          "(the largest seller's record count)")
    return SellersConfig(runtime=runtime, sellers=tuple(sellers), tls=tls, grpc=cfg.grpc, max_samples=max_samples,
                         source=source, flower=cfg.flower, superlink=superlink)


def _seller(entry: Mapping[str, Any], where: str, base: Path, name: str, runtime: str, remote: bool) -> SellerEntry:
    check_keys(entry, ("id", "endpoint", "data", "ca", "node-id"), where, name)
    sid = entry.get("id")
    if not isinstance(sid, str) or not sid:
        raise ConfigError(f"{name}: {where}id is missing; give each seller its public id")
    endpoint = entry.get("endpoint")
    if runtime == "grpc" and not (isinstance(endpoint, str) and ":" in endpoint):
        raise ConfigError(f"{name}: {where}endpoint must be host:port of the seller's 'tip-fed seller serve' "
                          f"with runtime = 'grpc', got {endpoint!r}")
    node = entry.get("node-id")
    if remote:
        if isinstance(node, bool) or not isinstance(node, int) or node < 0:
            raise ConfigError(f"{name}: {where}node-id must be the node id registered for this seller's SuperNode "
                              f"key ('flwr supernode register' prints it), got {node!r}")
    elif node is not None:
        raise ConfigError(f"{name}: {where}node-id goes with [superlink] (an existing SuperLink); a local "
                          "deployment registers its own nodes")
    if runtime in FILE_RUNTIMES or (runtime == "flower-deployment" and not remote):
        if "data" not in entry:
            raise ConfigError(f"{name}: {where}data is missing; runtime = {runtime!r} reads each seller's records "
                              f"(one of {', '.join(DATA_SUFFIXES)})")
    elif "data" in entry:
        raise ConfigError(f"{name}: {where}data does not go with runtime = {runtime!r}"
                          f"{' and [superlink]' if remote else ''}: those sellers hold their own data")
    return SellerEntry(id=sid, endpoint=endpoint if isinstance(endpoint, str) else None,
                       data=data_file(base, entry["data"], f"{where}data", name) if "data" in entry else None,
                       ca=existing_path(base, entry["ca"], f"{where}ca", name) if "ca" in entry else None,
                       node_id=node if remote else None)


def _superlink(t: dict[str, Any], base: Path, name: str, runtime: str) -> SuperLinkFiles | None:
    if not t:
        return None
    if runtime != "flower-deployment":
        raise ConfigError(f"{name}: [superlink] goes with runtime = 'flower-deployment', not {runtime!r}")
    check_keys(t, ("address", "root-certificates", "insecure", "publisher-key"), "superlink.", name)
    address = string(t, "address", "superlink.", name)
    if address is None or ":" not in address:
        raise ConfigError(f"{name}: superlink.address must be host:port of the SuperLink, got {address!r}")
    insecure = flag(t, "insecure", "superlink.", name)
    if insecure == ("root-certificates" in t):
        raise ConfigError(f"{name}: [superlink] needs exactly one of root-certificates = \"ca.crt\" (the CA of the "
                          "SuperLink's certificate) or insecure = true")
    if "publisher-key" not in t:
        raise ConfigError(f"{name}: superlink.publisher-key is missing: the sellers' SuperNodes run only apps signed "
                          "by a key they trust; name its private half ('tip-fed deploy keygen' makes one)")
    return SuperLinkFiles(
        address=address, insecure=insecure,
        publisher_key=existing_path(base, t["publisher-key"], "superlink.publisher-key", name),
        root_certificates=(existing_path(base, t["root-certificates"], "superlink.root-certificates", name)
                           if "root-certificates" in t else None))


def _tls(t: dict[str, Any], base: Path, name: str, runtime: str, pinned: bool) -> ClientTLSFiles:
    """``pinned``: every seller names its own CA, so [tls] needs none."""
    check_keys(t, ("ca", "cert", "key", "insecure", "bind-seller-id"), "tls.", name)
    insecure, bind = flag(t, "insecure", "tls.", name), flag(t, "bind-seller-id", "tls.", name)
    files = {k: existing_path(base, t[k], f"tls.{k}", name) for k in ("ca", "cert", "key") if k in t}
    if insecure and files:
        raise ConfigError(f"{name}: tls.insecure = true does not go with tls.ca/cert/key; choose one")
    if ("cert" in files) != ("key" in files):
        raise ConfigError(f"{name}: tls.cert and tls.key go together (the buyer's client certificate and its key)")
    if runtime == "grpc" and not insecure and "ca" not in files and not pinned:
        raise ConfigError(f"{name}: runtime = 'grpc' needs [tls] ca = \"ca.crt\" (with cert and key for mutual TLS) "
                          "or a ca for every seller, or [tls] insecure = true on a trusted network")
    return ClientTLSFiles(ca=files.get("ca"), cert=files.get("cert"), key=files.get("key"), insecure=insecure,
                          bind_seller_id=bind)
