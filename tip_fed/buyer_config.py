"""``buyer.toml`` and ``sellers.toml``: what ``tip-fed buyer prepare`` and ``tip-fed value`` read.

Parsing is light (no torch, no TenSEAL, no grpcio), so a typo is reported before anything heavy
loads. Unknown keys are errors, every message names the key and how to fix it, and paths are
relative to the TOML file. The protocol sections (``[projection]``, ``[preconditioner]``,
``[crypto]``, ``[protocol]``, ``[payouts]``, ``[grpc]``) are validated by their typed classes in
:mod:`tip_fed.config`, exactly as in a scenario config.

buyer.toml::

    seed = 0                              # projection seed
    batch-size = 64                       # samples per gradient batch
    [model]
    task = "classification"               # or "causal-lm", "sequence-classification"
    mlp = [64, 32, 10]                    # a tip_fed MLP ... (bias = true)
    weights = "model.safetensors"         # ... with its weights
    # path = "hf-model/"                  # or a Hugging Face save_pretrained directory
    # sequential = [...]                  # or a declarative torch Sequential + weights
    [data]
    objective = "objective.safetensors"   # what the buyer wants its model to do better on
    train = "train.safetensors"           # optional: fits the preconditioner (default: objective)
    format = "safetensors"
    [projection] / [preconditioner] / [crypto] / [protocol] / [payouts]

sellers.toml::

    runtime = "grpc"                      # or "inprocess"
    max-samples = 10000                   # optional: largest seller (default: asked / counted)
    [[sellers]]
    id = "clinic-a"
    endpoint = "10.0.0.5:50051"           # grpc: where 'tip-fed seller serve' listens
    # data = "clinic-a.safetensors"       # inprocess: the seller's records
    # ca = "clinic-a-ca.crt"              # optional: the only CA trusted for this seller
    [tls]
    ca = "tls/ca.crt"                     # CA of the sellers' server certificates
    cert = "tls/buyer.crt"                # client certificate and key (mutual TLS)
    key = "tls/buyer.key"
    # insecure = true                     # plaintext gRPC (trusted networks, tests)
    [grpc]
    timeout-s = 600                       # deadline of one seller's answer; retries, max-message-mb
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tip_fed.config import (
    RUNTIMES,
    SETTING_SECTIONS,
    CryptoConfig,
    GrpcConfig,
    PayoutsConfig,
    PreconditionerConfig,
    ProjectionConfig,
    ProtocolConfig,
    config_from_dict,
    parse_settings,
)
from tip_fed.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from tip_fed.protocol.prepared import BuyerSettings

DATA_FORMATS = ("safetensors",)  # raw formats (CSV, JSONL) register here with their loader
WIRED_RUNTIMES = ("inprocess", "grpc")


@dataclass(frozen=True)
class ModelSource:
    """Where the buyer's model comes from: one of a local Hugging Face directory, a tip_fed MLP or
    a declarative Sequential (the last two with a safetensors weights file)."""

    kind: str  # "path" | "mlp" | "sequential"
    path: Path | None = None
    sizes: tuple[int, ...] = ()
    bias: bool = True
    layers: tuple[Any, ...] = ()
    weights: Path | None = None


@dataclass(frozen=True)
class BuyerConfig:
    """A parsed ``buyer.toml``."""

    source: Path
    model: ModelSource
    task: str
    objective: Path
    train: Path | None
    data_format: str
    projection: ProjectionConfig
    preconditioner: PreconditionerConfig
    crypto: CryptoConfig
    protocol: ProtocolConfig
    payouts: PayoutsConfig
    seed: int = 0
    batch_size: int = 64
    input_format: Mapping[str, Any] | None = None  # the [format] table of raw data formats, as written

    def settings(self) -> BuyerSettings:
        """The protocol settings as the Buyer takes them."""
        from tip_fed.protocol.prepared import BuyerSettings

        return BuyerSettings(projection=self.projection, preconditioner=self.preconditioner, crypto=self.crypto,
                             protocol=self.protocol, seed=self.seed, batch_size=self.batch_size)


@dataclass(frozen=True)
class SellerEntry:
    """One seller of ``sellers.toml``: its id and where to reach it (endpoint) or its data (inprocess)."""

    id: str
    endpoint: str | None = None
    data: Path | None = None
    ca: Path | None = None


@dataclass(frozen=True)
class ClientTLSFiles:
    """The buyer's TLS material for gRPC sellers (or ``insecure``)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False
    bind_seller_id: bool = False


@dataclass(frozen=True)
class SellersConfig:
    """A parsed ``sellers.toml``."""

    runtime: str
    sellers: tuple[SellerEntry, ...]
    tls: ClientTLSFiles
    grpc: GrpcConfig
    max_samples: int | None = None
    source: Path | None = None


def _read_toml(path: str | Path, what: str, example: str) -> tuple[Path, dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file '{p}' does not exist; write one (see {example})")
    try:
        return p.resolve(), tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} file '{p}' is not valid TOML: {exc}") from None


def _keys(table: Mapping[str, Any], allowed: tuple[str, ...], where: str, name: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{name}: unknown key '{where}{unknown[0]}'; valid keys here: "
                          + ", ".join(f"{where}{k}" for k in allowed))


def _table(data: Mapping[str, Any], key: str, name: str, required: bool = True) -> dict[str, Any]:
    value = data.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: [{key}] is {'missing' if value is None else 'not a table'}; add a [{key}] table")
    return dict(value)


def _file(base: Path, value: Any, key: str, name: str, *, directory: bool = False) -> Path:
    """``value`` as a path relative to the TOML file; ConfigError unless it exists."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: {key} must be a path (a string), got {value!r}")
    path = (base / value).resolve()
    ok = path.is_dir() if directory else path.is_file()
    if not ok:
        kind = "directory" if directory else "file"
        raise ConfigError(f"{name}: {key} = {value!r}: {kind} {path} does not exist; paths are relative to {name}")
    return path


def _model_source(table: dict[str, Any], base: Path, name: str) -> ModelSource:
    _keys(table, ("task", "path", "mlp", "bias", "sequential", "weights"), "model.", name)
    kinds = [k for k in ("path", "mlp", "sequential") if k in table]
    if len(kinds) != 1:
        raise ConfigError(f"{name}: [model] needs exactly one of path (a save_pretrained directory), "
                          f"mlp = [sizes] or sequential = [...] (with weights); got {kinds or 'none'}")
    kind = kinds[0]
    if kind == "path":
        for extra in ("weights", "bias"):
            if extra in table:
                raise ConfigError(f"{name}: model.{extra} does not go with model.path (its weights are in the directory)")
        return ModelSource("path", path=_file(base, table["path"], "model.path", name, directory=True))
    if "weights" not in table:
        raise ConfigError(f"{name}: model.{kind} needs model.weights = \"file.safetensors\" (the trained weights)")
    weights = _file(base, table["weights"], "model.weights", name)
    if kind == "mlp":
        sizes = table["mlp"]
        if not isinstance(sizes, list) or len(sizes) < 2 or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
            raise ConfigError(f"{name}: model.mlp must list >= 2 layer sizes (positive integers), e.g. [64, 32, 10]")
        bias = table.get("bias", True)
        if not isinstance(bias, bool):
            raise ConfigError(f"{name}: model.bias must be true or false")
        return ModelSource("mlp", sizes=tuple(sizes), bias=bias, weights=weights)
    if "bias" in table:
        raise ConfigError(f"{name}: model.bias goes with model.mlp; a sequential states bias per layer")
    layers = table["sequential"]
    if not isinstance(layers, list) or not layers:
        raise ConfigError(f"{name}: model.sequential must be a non-empty list of layers")
    return ModelSource("sequential", layers=tuple(layers), weights=weights)


def load_buyer_config(path: str | Path) -> BuyerConfig:
    """Parse and check ``buyer.toml`` (files exist, keys known, values valid), without heavy imports."""
    source, data = _read_toml(path, "buyer config", "the tip_fed.buyer_config docstring")
    name, base = source.name, source.parent
    _keys(data, ("model", "data", "format", *SETTING_SECTIONS, "payouts", "seed", "batch-size"), "", name)
    model_table = _table(data, "model", name)
    model = _model_source(model_table, base, name)
    task = model_table.get("task")
    if not isinstance(task, str):
        raise ConfigError(f"{name}: model.task is missing; set it to classification, causal-lm or "
                          "sequence-classification")
    data_table = _table(data, "data", name)
    _keys(data_table, ("objective", "train", "format"), "data.", name)
    if "objective" not in data_table:
        raise ConfigError(f"{name}: data.objective is missing; give the buyer's objective set (a path)")
    data_format = data_table.get("format", "safetensors")
    if data_format not in DATA_FORMATS:
        raise ConfigError(f"{name}: data.format = {data_format!r} is not supported; use one of {list(DATA_FORMATS)}")
    objective = _file(base, data_table["objective"], "data.objective", name)
    train = _file(base, data_table["train"], "data.train", name) if "train" in data_table else None
    fmt = data.get("format")
    if fmt is not None:  # raw data formats (CSV, JSONL) parse their table here
        raise ConfigError(f"{name}: [format] (raw CSV/JSONL records) is not supported by this version of tip_fed; "
                          "remove it and give datasets as safetensors files (tip_fed.save_dataset)")
    try:
        settings = parse_settings(data, "")
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    from tip_fed.core.tasks import TASKS  # after every cheap check: this loads torch

    if task not in TASKS:
        raise ConfigError(f"{name}: model.task = {task!r} is unknown; use one of {', '.join(sorted(TASKS))}")
    return BuyerConfig(source=source, model=model, task=task, objective=objective, train=train,
                       data_format=data_format, input_format=None, **settings)


def load_sellers_config(path: str | Path) -> SellersConfig:
    """Parse and check ``sellers.toml`` (runtime, unique seller ids, endpoints or data, TLS files)."""
    source, data = _read_toml(path, "sellers config", "the tip_fed.buyer_config docstring")
    name, base = source.name, source.parent
    _keys(data, ("runtime", "sellers", "tls", "grpc", "max-samples"), "", name)
    runtime = data.get("runtime", "grpc")
    if runtime not in RUNTIMES:
        raise ConfigError(f"{name}: runtime = {runtime!r} is unknown; use one of {', '.join(RUNTIMES)}")
    max_samples = data.get("max-samples")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ConfigError(f"{name}: max-samples must be an integer >= 1 (the largest seller's record count)")
    entries = data.get("sellers")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, Mapping) for e in entries):
        raise ConfigError(f"{name}: list the sellers as [[sellers]] tables, each with an id and an endpoint or data")
    sellers: list[SellerEntry] = []
    for i, entry in enumerate(entries):
        where = f"sellers[{i}]."
        _keys(entry, ("id", "endpoint", "data", "ca"), where, name)
        sid = entry.get("id")
        if not isinstance(sid, str) or not sid:
            raise ConfigError(f"{name}: {where}id is missing; give each seller its public id")
        if sid in {s.id for s in sellers}:
            raise ConfigError(f"{name}: seller id {sid!r} is listed twice; seller ids must be unique")
        endpoint = entry.get("endpoint")
        if runtime == "grpc" and not (isinstance(endpoint, str) and ":" in endpoint):
            raise ConfigError(f"{name}: {where}endpoint must be host:port of the seller's 'tip-fed seller serve' "
                              f"with runtime = 'grpc', got {endpoint!r}")
        if runtime == "inprocess" and "data" not in entry:
            raise ConfigError(f"{name}: {where}data is missing; runtime = 'inprocess' reads each seller's records")
        sellers.append(SellerEntry(
            id=sid, endpoint=endpoint if isinstance(endpoint, str) else None,
            data=_file(base, entry["data"], f"{where}data", name) if "data" in entry else None,
            ca=_file(base, entry["ca"], f"{where}ca", name) if "ca" in entry else None))
    tls = _tls(_table(data, "tls", name, required=False), base, name, runtime, all(s.ca for s in sellers))
    try:
        grpc = config_from_dict({"grpc": _table(data, "grpc", name, required=False)}).grpc
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return SellersConfig(runtime=runtime, sellers=tuple(sellers), tls=tls, grpc=grpc, max_samples=max_samples,
                         source=source)


def _tls(table: dict[str, Any], base: Path, name: str, runtime: str, pinned: bool) -> ClientTLSFiles:
    """``pinned``: every seller names its own CA, so [tls] needs none."""
    _keys(table, ("ca", "cert", "key", "insecure", "bind-seller-id"), "tls.", name)
    for flag in ("insecure", "bind-seller-id"):
        if not isinstance(table.get(flag, False), bool):
            raise ConfigError(f"{name}: tls.{flag} must be true or false")
    files = {k: _file(base, table[k], f"tls.{k}", name) for k in ("ca", "cert", "key") if k in table}
    insecure = table.get("insecure", False)
    if insecure and files:
        raise ConfigError(f"{name}: tls.insecure = true does not go with tls.ca/cert/key; choose one")
    if ("cert" in files) != ("key" in files):
        raise ConfigError(f"{name}: tls.cert and tls.key go together (the buyer's client certificate and its key)")
    if runtime == "grpc" and not insecure and "ca" not in files and not pinned:
        raise ConfigError(f"{name}: runtime = 'grpc' needs [tls] ca = \"ca.crt\" (with cert and key for mutual TLS) "
                          "or a ca for every seller, or [tls] insecure = true on a trusted network")
    return ClientTLSFiles(ca=files.get("ca"), cert=files.get("cert"), key=files.get("key"), insecure=insecure,
                          bind_seller_id=table.get("bind-seller-id", False))


# ---- loading what a parsed buyer.toml names (heavy imports stay inside the functions) ----

def load_model(source: ModelSource) -> Any:
    """The buyer's torch model (eval mode) from a :class:`ModelSource`; ModelError if unusable."""
    from tip_fed.core import models

    if source.kind == "path" and source.path is not None:
        return models.load_local(source.path)
    if source.weights is None:
        raise ConfigError(f"model.{source.kind} needs model.weights = \"file.safetensors\" (the trained weights)")
    from tip_fed.errors import ModelError

    model = (models.MLP(source.sizes, bias=source.bias) if source.kind == "mlp"
             else models.sequential_from_spec(source.layers))
    try:
        return models.load_weights(model, source.weights).eval()
    except ModelError as exc:
        raise ModelError(f"model.weights {source.weights} do not fit the model described in [model]: {exc}") from None


def load_data(path: Path, data_format: str) -> Any:
    """A dataset named in [data] (safetensors dict of tensors)."""
    if data_format != "safetensors":
        raise ConfigError(f"data.format = {data_format!r} is not supported; use one of {list(DATA_FORMATS)}")
    from tip_fed.protocol.data import load_dataset

    return load_dataset(path)


def prepare_from_config(cfg: BuyerConfig) -> Any:
    """Fit the buyer's :class:`~tip_fed.protocol.prepared.PreparedQuery` from a parsed buyer.toml."""
    from dataclasses import replace

    from tip_fed.core.tasks import get_task
    from tip_fed.protocol.prepared import fit_query

    model = load_model(cfg.model)
    objective = load_data(cfg.objective, cfg.data_format)
    train = load_data(cfg.train, cfg.data_format) if cfg.train is not None else None
    prepared = fit_query(model, get_task(cfg.task), objective, train, cfg.settings(), cfg.input_format)
    return replace(prepared, sources=_sources(cfg))


def _sources(cfg: BuyerConfig) -> dict[str, str]:
    """sha256 of the data files a query is fitted from, to tell later whether they changed."""
    import hashlib

    files = {"objective": cfg.objective, "train": cfg.train}
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() if p else "" for k, p in files.items()}


def check_prepared(cfg: BuyerConfig, prepared: Any, where: str) -> Any:
    """The prepared query to value with: ``prepared`` itself when it was fitted for this buyer.toml's
    task, settings, model and data; re-queried with its saved preconditioner when only data.objective
    changed; ConfigError for anything else (that needs a new fit)."""
    fix = f"run 'tip-fed buyer prepare {cfg.source.name} --out {where} --force' again"
    if prepared.task != cfg.task:
        raise ConfigError(f"the prepared query in {where} is for task {prepared.task!r}, {cfg.source.name} says "
                          f"{cfg.task!r}; {fix}")
    if prepared.settings != cfg.settings():
        raise ConfigError(f"the prepared query in {where} was fitted with other settings than {cfg.source.name}'s "
                          f"[projection]/[preconditioner]/[crypto]/[protocol]/seed/batch-size; {fix}")
    from tip_fed.protocol.model import model_fingerprint

    model = load_model(cfg.model)
    if model_fingerprint(model) != prepared.model_fingerprint:
        raise ConfigError(f"the prepared query in {where} was fitted for another model than {cfg.source.name}'s "
                          f"[model] (fingerprints differ); {fix}")
    now = _sources(cfg)
    if not prepared.sources or prepared.sources == now:
        return prepared
    if prepared.sources.get("train") != now["train"] or not cfg.train:
        raise ConfigError(f"data.train of {cfg.source.name} changed since the query in {where} was prepared (or "
                          f"there is none, so the preconditioner was fitted on the old objective); {fix}")
    from dataclasses import replace

    requeried = prepared.with_objective(load_data(cfg.objective, cfg.data_format), model=model)
    return replace(requeried, sources=now)
