"""``buyer.toml``: what ``tip-fed buyer prepare`` and ``tip-fed value`` read about the buyer.

Parsing is light (no torch, no TenSEAL, no grpcio), so a typo is reported before anything heavy
loads. Unknown keys are errors, every message names the key and how to fix it, and paths are
relative to the TOML file. The protocol sections (``[projection]``, ``[preconditioner]``,
``[crypto]``, ``[protocol]``, ``[payouts]``) are validated by their typed classes in
:mod:`tip_fed.config`, exactly as in a scenario config. ``sellers.toml`` is
:mod:`tip_fed.sellers_config`.

buyer.toml::

    seed = 0                              # projection seed
    batch-size = 64                       # samples per gradient batch
    [model]
    task = "classification"               # or "causal-lm", "sequence-classification"
    mlp = [64, 32, 10]                    # a tip_fed MLP ... (bias = true)
    weights = "model.safetensors"         # ... with its weights
    # path = "hf-model/"                  # or a Hugging Face save_pretrained directory
    # sequential = [...]                  # or a declarative torch Sequential + weights
    [data]                                # by extension: .safetensors (tensors in the task's format)
    objective = "objective.csv"           # or raw records: .csv, .parquet, .jsonl, .txt (need [format])
    train = "train.csv"                   # optional: fits the preconditioner (default: objective)
    [format]                              # how raw records become tensors; sellers get it in each Offer
    kind = "table"                        # table: standardised feature columns and a label
    features = ["age", "bmi"]
    label = "outcome"
    # classes = ["no", "yes"]             # default: the sorted label values of the fitted-on records
    # regression = false                  # true: the label is a number
    # kind = "text"                       # text: the buyer's tokenizer.json travels in every Offer
    # tokenizer = "tok/"                  # save_pretrained directory or tokenizer.json
    #                                     #   (default: the [model] path directory)
    # max-length = 128                    # tokens per record (default: the tokenizer's model_max_length)
    # text-field = "text"                 # record field holding the text
    # label-field = "label"               # sequence classification: the label field ...
    # classes = ["neg", "pos"]            # ... and its classes
    [projection] / [preconditioner] / [crypto] / [protocol] / [payouts]

A table format is fitted (feature offsets and scales, classes) on the buyer's train records, else
its objective records, so it is part of the prepared query: ``tip-fed value --prepared`` refuses a
query whose format differs from what buyer.toml gives now.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tip_fed.config import BuyerSettings, PayoutsConfig, parse_settings
from tip_fed.errors import ConfigError, DataError
from tip_fed.sellers_config import (
    ClientTLSFiles,
    SellerEntry,
    SellersConfig,
    data_file,
    load_sellers_config,
)
from tip_fed.toml_files import (
    check_keys,
    existing_path,
    flag,
    keys_of,
    positive_int,
    read_toml,
    string,
    table,
)

if TYPE_CHECKING:  # pragma: no cover
    from tip_fed.protocol.formats import InputFormat
    from tip_fed.protocol.prepared import PreparedQuery
    from tip_fed.protocol.records import RawRecords

__all__ = ["BuyerConfig", "ClientTLSFiles", "FormatSpec", "ModelSource", "SellerEntry", "SellersConfig",
           "build_input_format", "check_buyer_task", "check_prepared", "load_buyer_config", "load_data", "load_model",
           "load_sellers_config", "prepare_from_config"]

DOC = "the tip_fed.buyer_config docstring"
TENSOR_SUFFIX = ".safetensors"
FORMAT_KEYS = {"table": ("kind", "features", "label", "classes", "regression"),
               "text": ("kind", "tokenizer", "max-length", "text-field", "label-field", "classes")}


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
class FormatSpec:
    """The ``[format]`` table as written: what :func:`build_input_format` makes the input format from."""

    kind: str  # "table" | "text"
    features: tuple[str, ...] = ()
    label: str | None = None
    classes: tuple[str, ...] | None = None
    regression: bool = False
    tokenizer: Path | None = None
    max_length: int | None = None
    text_field: str = "text"
    label_field: str | None = None

    def reads(self) -> dict[str, str]:
        """Record field -> the [format] key that names it."""
        if self.kind == "table":
            return {**{f: "format.features" for f in self.features}, str(self.label): "format.label"}
        fields = {self.text_field: "format.text-field"}
        return fields if self.label_field is None else {**fields, self.label_field: "format.label-field"}


@dataclass(frozen=True)
class BuyerConfig:
    """A parsed ``buyer.toml``."""

    source: Path
    model: ModelSource
    task: str
    objective: Path
    train: Path | None
    buyer: BuyerSettings  # seed, batch-size, [projection], [preconditioner], [crypto], [protocol]
    payouts: PayoutsConfig
    input_format: FormatSpec | None = None  # the [format] table (raw records)

    def settings(self) -> BuyerSettings:
        """The protocol settings as the Buyer takes them."""
        return self.buyer


def _model_source(t: dict[str, Any], base: Path, name: str) -> ModelSource:
    check_keys(t, ("task", "path", "mlp", "bias", "sequential", "weights"), "model.", name)
    kinds = [k for k in ("path", "mlp", "sequential") if k in t]
    if len(kinds) != 1:
        raise ConfigError(f"{name}: [model] needs exactly one of path (a save_pretrained directory), "
                          f"mlp = [sizes] or sequential = [...] (with weights); got {kinds or 'none'}")
    kind = kinds[0]
    if kind == "path":
        for extra in ("weights", "bias"):
            if extra in t:
                raise ConfigError(f"{name}: model.{extra} does not go with model.path (its weights are in the "
                                  f"directory)")
        return ModelSource("path", path=existing_path(base, t["path"], "model.path", name, directory=True))
    if "weights" not in t:
        raise ConfigError(f'{name}: model.{kind} needs model.weights = "file.safetensors" (the trained weights)')
    weights = existing_path(base, t["weights"], "model.weights", name)
    if kind == "mlp":
        sizes = t["mlp"]
        if (
            not isinstance(sizes, list)
            or len(sizes) < 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
        ):
            raise ConfigError(f"{name}: model.mlp must list >= 2 layer sizes (positive integers), e.g. [64, 32, 10]")
        return ModelSource(
            "mlp", sizes=tuple(sizes), bias=flag({"bias": t.get("bias", True)}, "bias", "model.", name), weights=weights
        )
    if "bias" in t:
        raise ConfigError(f"{name}: model.bias goes with model.mlp; a sequential states bias per layer")
    layers = t["sequential"]
    if not isinstance(layers, list) or not layers:
        raise ConfigError(f"{name}: model.sequential must be a non-empty list of layers")
    return ModelSource("sequential", layers=tuple(layers), weights=weights)


def _names(t: Mapping[str, Any], key: str, name: str, what: str) -> tuple[str, ...] | None:
    value = t.get(key)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) and v != "" for v in value)
    ):
        raise ConfigError(f"{name}: format.{key} must be a non-empty list of {what}, got {value!r}")
    return tuple(str(v) for v in value) if key == "features" else tuple(value)


def _format_spec(t: dict[str, Any], base: Path, name: str, model: ModelSource) -> FormatSpec:
    kind = t.get("kind")
    if kind not in FORMAT_KEYS:
        raise ConfigError(
            f'{name}: format.kind must be "table" (CSV/Parquet columns) or "text" (JSONL/plain '
            f"text with the buyer's tokenizer), got {kind!r}"
        )
    check_keys(t, FORMAT_KEYS[kind], "format.", name)
    classes = _names(t, "classes", name, "label values")
    if kind == "table":
        features = _names(t, "features", name, "column names")
        label = string(t, "label", "format.", name)
        if features is None or label is None:
            raise ConfigError(
                f'{name}: format.kind = "table" needs features = ["col", ...] (the model\'s input '
                'columns, in order) and label = "col"'
            )
        regression = flag(t, "regression", "format.", name)
        if regression and classes is not None:
            raise ConfigError(f"{name}: format.classes does not go with format.regression = true")
        return FormatSpec("table", features=features, label=label, classes=classes, regression=regression)
    if "tokenizer" in t:
        tokenizer = existing_path(base, t["tokenizer"], "format.tokenizer", name, directory=None)
    elif model.kind == "path" and model.path is not None and (model.path / "tokenizer.json").is_file():
        tokenizer = model.path
    else:
        raise ConfigError(
            f"{name}: format.tokenizer is missing and [model] path holds no tokenizer.json; set "
            'tokenizer = "dir/" (saved with save_pretrained) or "tokenizer.json"'
        )
    return FormatSpec(
        "text",
        classes=classes,
        tokenizer=tokenizer,
        max_length=positive_int(t, "max-length", "format.", name, "tokens per record"),
        text_field=string(t, "text-field", "format.", name, "text") or "text",
        label_field=string(t, "label-field", "format.", name),
    )


def load_buyer_config(path: str | Path, *, check_task: bool = True) -> BuyerConfig:
    """Parse and check ``buyer.toml`` (files exist, keys known, values valid); only the task check
    loads torch, last (``check_task=False`` leaves it to :func:`check_buyer_task`, so a command can
    report every other mistake before it starts loading)."""
    source, data = read_toml(path, "buyer config", f"write one (see {DOC})")
    name, base = source.name, source.parent
    check_keys(data, ("model", "data", "format", *keys_of(BuyerSettings), "payouts"), "", name)
    model_table = table(data, "model", name)
    model = _model_source(model_table, base, name)
    task = model_table.get("task")
    if not isinstance(task, str):
        raise ConfigError(
            f"{name}: model.task is missing; set it to classification, causal-lm or sequence-classification"
        )
    data_table = table(data, "data", name)
    check_keys(data_table, ("objective", "train"), "data.", name)
    if "objective" not in data_table:
        raise ConfigError(f"{name}: data.objective is missing; give the buyer's objective set (a path)")
    objective = data_file(base, data_table["objective"], "data.objective", name)
    train = data_file(base, data_table["train"], "data.train", name) if "train" in data_table else None
    fmt = _format_spec(table(data, "format", name), base, name, model) if "format" in data else None
    raw = [
        (k, p)
        for k, p in (("data.objective", objective), ("data.train", train))
        if p is not None and p.suffix.lower() != TENSOR_SUFFIX
    ]
    if raw and fmt is None:
        key, p = raw[0]
        raise ConfigError(
            f"{name}: {key} = {p.name!r} holds raw records; add a [format] table saying how they "
            'become tensors: kind = "table" with features = ["col", ...] and label = "col", or '
            'kind = "text" with tokenizer = "dir/" (see the tip_fed.buyer_config docstring)'
        )
    if fmt is not None and fmt.kind == "table" and not raw:
        raise ConfigError(
            f'{name}: format.kind = "table" is fitted on the buyer\'s raw records, but data.objective '
            "and data.train are safetensors; give data.train (or data.objective) as .csv/.parquet/.jsonl"
        )
    settings = parse_settings(data, f"{name}: ")
    cfg = BuyerConfig(source=source, model=model, task=task, objective=objective, train=train, input_format=fmt,
                      buyer=settings["settings"], payouts=settings["payouts"])
    if check_task:
        check_buyer_task(cfg)
    return cfg


def check_buyer_task(cfg: BuyerConfig) -> None:
    """ConfigError unless ``cfg.task`` is a built-in task (this loads torch)."""
    from tip_fed.core.tasks import TASKS

    if cfg.task not in TASKS:
        raise ConfigError(f"{cfg.source.name}: model.task = {cfg.task!r} is unknown; use one of "
                          f"{', '.join(sorted(TASKS))}")


# ---- loading what a parsed buyer.toml names (heavy imports stay inside the functions) ----


def load_model(source: ModelSource) -> Any:
    """The buyer's torch model (eval mode) from a :class:`ModelSource`; ModelError if unusable."""
    from tip_fed.core import models

    if source.kind == "path" and source.path is not None:
        return models.load_local(source.path)
    if source.weights is None:
        raise ConfigError(f'model.{source.kind} needs model.weights = "file.safetensors" (the trained weights)')
    from tip_fed.errors import ModelError

    model = (
        models.MLP(source.sizes, bias=source.bias)
        if source.kind == "mlp"
        else models.sequential_from_spec(source.layers)
    )
    try:
        return models.load_weights(model, source.weights).eval()
    except ModelError as exc:
        raise ModelError(f"model.weights {source.weights} do not fit the model described in [model]: {exc}") from None


def load_data(path: Path) -> Any:
    """A dataset named in [data] or sellers.toml: tensors (.safetensors) or raw records (by extension)."""
    from tip_fed.protocol.records import load_seller_data

    return load_seller_data(path)


def build_input_format(cfg: BuyerConfig, objective: Any, train: Any = None) -> InputFormat | None:
    """The input format of ``[format]`` (None without one); a table format is fitted on ``train``'s
    records, else ``objective``'s. ConfigError naming the [format] key the data does not fit."""
    spec, name = cfg.input_format, cfg.source.name
    if spec is None:
        return None
    from tip_fed.protocol.formats import TableFormat, TextFormat
    from tip_fed.protocol.records import RawRecords

    raw: dict[str, RawRecords] = {
        k: d for k, d in (("data.objective", objective), ("data.train", train)) if isinstance(d, RawRecords)
    }
    for key, records in raw.items():
        for field, names in spec.reads().items():
            if field not in records.fields:
                have = ", ".join(repr(f) for f in sorted(records.fields)[:20])
                raise ConfigError(
                    f"{name}: {names} names field {field!r}, which {key} ({records.source}) does not "
                    f"have in every record (it has {have}); fix {names} or the file"
                )
    try:
        if spec.kind == "text":
            return TextFormat.from_pretrained(
                spec.tokenizer or cfg.source.parent,
                spec.max_length,
                text_field=spec.text_field,
                label_field=spec.label_field,
                classes=spec.classes,
            )
        fit_on = raw.get("data.train", raw.get("data.objective"))
        if fit_on is None:
            raise ConfigError(
                f'{name}: format.kind = "table" is fitted on raw records; give data.train or '
                "data.objective as .csv/.parquet/.jsonl"
            )
        return TableFormat.fit(fit_on, spec.features, str(spec.label), regression=spec.regression, classes=spec.classes)
    except DataError as exc:
        key = "format.tokenizer / format.max-length" if spec.kind == "text" else "format.features / format.label"
        raise ConfigError(f"{name}: [format] does not fit the buyer's data ({key}): {exc}") from None


def _load_inputs(cfg: BuyerConfig) -> tuple[Any, Any, InputFormat | None]:
    """Objective, train and the input format they are encoded with."""
    objective = load_data(cfg.objective)
    train = load_data(cfg.train) if cfg.train is not None else None
    return objective, train, build_input_format(cfg, objective, train)


def prepare_from_config(cfg: BuyerConfig, *, progress: bool = False) -> PreparedQuery:
    """Fit the buyer's :class:`~tip_fed.protocol.prepared.PreparedQuery` from a parsed buyer.toml."""
    from dataclasses import replace

    from tip_fed.console import phase
    from tip_fed.core.tasks import get_task
    from tip_fed.protocol.prepared import fit_query

    phase(f"loading the model of {cfg.source.name}", enabled=progress)
    model = load_model(cfg.model)
    phase("reading the buyer's objective and train data", enabled=progress)
    objective, train, fmt = _load_inputs(cfg)
    phase("fitting the query: gradients, preconditioner, projection ranks, encryption", enabled=progress)
    try:
        prepared = fit_query(model, get_task(cfg.task), objective, train, cfg.settings(), fmt)
    except DataError as exc:
        if fmt is None:
            raise
        raise ConfigError(f"{cfg.source.name}: [format] cannot encode the buyer's data: {exc}") from None
    return replace(prepared, sources=_sources(cfg))


def _sources(cfg: BuyerConfig) -> dict[str, str]:
    """sha256 of the data files a query is fitted from, to tell later whether they changed."""
    import hashlib

    files = {"objective": cfg.objective, "train": cfg.train}
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() if p else "" for k, p in files.items()}


def _format_bytes(fmt: InputFormat | None) -> bytes:
    return b"" if fmt is None else fmt.to_pb().SerializeToString(deterministic=True)


def check_prepared(cfg: BuyerConfig, prepared: PreparedQuery, where: str) -> PreparedQuery:
    """The prepared query to value with: ``prepared`` itself when it was fitted for this buyer.toml's
    task, settings, model, data and [format]; re-queried with its saved preconditioner when only
    data.objective changed; ConfigError for anything else (that needs a new fit)."""
    fix = f"run 'tip-fed buyer prepare {cfg.source.name} --out {where} --force' again"
    if prepared.task != cfg.task:
        raise ConfigError(
            f"the prepared query in {where} is for task {prepared.task!r}, {cfg.source.name} says {cfg.task!r}; {fix}"
        )
    if prepared.settings != cfg.settings():
        raise ConfigError(
            f"the prepared query in {where} was fitted with other settings than {cfg.source.name}'s "
            f"[projection]/[preconditioner]/[crypto]/[protocol]/seed/batch-size; {fix}"
        )
    from tip_fed.protocol.model import model_fingerprint

    model = load_model(cfg.model)
    if model_fingerprint(model) != prepared.model_fingerprint:
        raise ConfigError(
            f"the prepared query in {where} was fitted for another model than {cfg.source.name}'s "
            f"[model] (fingerprints differ); {fix}"
        )
    now = _sources(cfg)
    changed = bool(prepared.sources) and prepared.sources != now
    if changed and (prepared.sources.get("train") != now["train"] or not cfg.train):
        raise ConfigError(
            f"data.train of {cfg.source.name} changed since the query in {where} was prepared (or "
            f"there is none, so the preconditioner was fitted on the old objective); {fix}"
        )
    objective, _, fmt = _load_inputs(cfg)
    if _format_bytes(fmt) != _format_bytes(prepared.input_format):
        saved = "none" if prepared.input_format is None else type(prepared.input_format).__name__
        raise ConfigError(
            f"the prepared query in {where} was fitted with another input format ({saved}) than "
            f"{cfg.source.name}'s [format] gives now; {fix}"
        )
    if not changed:
        return prepared
    from dataclasses import replace

    requeried = prepared.with_objective(objective, model=model)
    return replace(requeried, sources=now)
