"""The buyer's input format as data: how raw records (tables, text) become the task's tensors.

A seller with CSV/Parquet tables or JSONL/plain text never runs the buyer's code. The buyer
ships its input format in every Offer (``Offer.input``): for tables the feature columns, the
label and its classes, and the preprocessing as numbers (per-feature offset and scale); for
text its ``tokenizer.json`` (a Hugging Face ``tokenizers`` serialization: data, not code), the
maximum length and the record fields. Buyer and sellers encode with the same functions here,
so both sides build identical tensors from identical records.

Everything read from an Offer is untrusted: :func:`check_input_pb` bounds every field before
anything is allocated or parsed, and the tokenizer is parsed only after the Offer was costed.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tip_fed.errors import DataError, ProtocolError
from tip_fed.protocol.records import RawRecords
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

__all__ = [
    "MAX_CLASSES",
    "MAX_FEATURES",
    "MAX_NAME_CHARS",
    "MAX_TEXT_LENGTH",
    "MAX_TOKENIZER_BYTES",
    "InputFormat",
    "TableFormat",
    "TextFormat",
    "check_fields",
    "check_input_pb",
    "encode_records",
    "format_digest",
    "format_from_pb",
    "label_text",
]

#: A tokenizer.json of a 250k-token vocabulary is ~10 MiB; a larger one is refused unparsed.
MAX_TOKENIZER_BYTES = 16 << 20
#: Sanity bound checked at decoding; the seller's resource budget refuses far shorter lengths
#: when its records and the model make them costly (tokens per record are costed at max_length).
MAX_TEXT_LENGTH = 1 << 24
#: Feature columns of one table format.
MAX_FEATURES = 1 << 16
#: Label classes of one format.
MAX_CLASSES = 1 << 16
#: Characters of a column, field or class name.
MAX_NAME_CHARS = 256
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Not caught with a buyer's tokenizer: everything else it raises is the buyer's fault. The Rust
#: ``tokenizers`` library reports a panic (e.g. a pre-tokenizer regex hitting Oniguruma's retry limit)
#: as ``pyo3_runtime.PanicException``, a BaseException, so catching Exception would let it escape.
_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)

log = logging.getLogger(__name__)


def label_text(value: Any) -> str:
    """The text a label value is matched by: ``1``, ``1.0`` and ``"1"`` are the same class.

    CSV cells are text while Parquet and JSON keep numbers, so classes are compared as text in one
    canonical form (integral floats drop their ``.0``, booleans are ``true``/``false``).
    """
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value.strip()
    raise DataError(f"label value {str(value)[:40]!r} is a {type(value).__name__}; labels must be text or numbers")


def _class_indices(records: RawRecords, field: str, classes: Sequence[str] | None, what: str) -> torch.Tensor:
    values = records.column(field, what)
    if classes is None:
        return torch.tensor([_number(v, field, i) for i, v in enumerate(values)], dtype=torch.float32)
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for i, value in enumerate(values):
        key = label_text(value)
        if key not in index:
            shown = ", ".join(repr(c) for c in list(classes)[:10]) + (", ..." if len(classes) > 10 else "")
            raise DataError(
                f"record {i + 1} of {records.source} has label {key[:40]!r} in column {field!r}, not one of the "
                f"buyer's classes ({shown}); drop such records or ask the buyer to add the class"
            )
        out.append(index[key])
    return torch.tensor(out, dtype=torch.long)


def _number(value: Any, column: str, i: int) -> float:
    try:
        x = float(value) if not isinstance(value, str) else float(value.strip())
    except (TypeError, ValueError):
        raise DataError(
            f"column {column!r} holds non-numeric value {str(value)[:40]!r} in record {i + 1}; the buyer's format "
            "needs numbers there: fill or drop missing values and convert categories to numbers"
        ) from None
    if not math.isfinite(x):
        raise DataError(f"column {column!r} holds {x} in record {i + 1}; fill or drop non-finite values")
    return x


def _feature_matrix(records: RawRecords, features: Sequence[str]) -> np.ndarray:
    """float64 [n, len(features)] of the named columns; DataError for a missing or non-numeric one."""
    return np.array([[_number(v, f, i) for i, v in enumerate(records.column(f, "feature"))] for f in features],
                    dtype=np.float64).T


def _finite(values: Sequence[float], what: str) -> None:
    if not all(math.isfinite(v) for v in values):
        raise ProtocolError(f"the input format's {what} has a non-finite value; every {what} must be a finite number")


@dataclass(frozen=True)
class TableFormat:
    """Feature columns, label and preprocessing of a tabular task (``x = (value - offset) / scale``).

    ``classes`` lists the label values (as text, see :func:`label_text`) in class-index order; None
    makes the label a float (regression). Build it from the buyer's own records with :meth:`fit`.
    """

    features: tuple[str, ...]
    label: str
    classes: tuple[str, ...] | None
    offset: tuple[float, ...]
    scale: tuple[float, ...]
    features_key: str = "x"
    label_key: str = "y"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # lists from a config file become tuples, so formats compare and hash by value
        for name in ("features", "offset", "scale"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(label_text(c) for c in self.classes))
        check_input_pb(pb.InputFormat(table=self._pb()))

    @classmethod
    def fit(cls, records: RawRecords, features: Sequence[str], label: str, *, regression: bool = False,
            classes: Sequence[Any] | None = None, **keys: str) -> TableFormat:
        """Standardise each feature with the mean and (population, ddof=0) std of ``records``.

        Classes are the sorted distinct label values unless given; a constant feature keeps scale 1.
        """
        x = _feature_matrix(records, features)
        std = x.std(axis=0)
        if classes is None and not regression:
            found = {label_text(v) for v in records.column(label, "label")}
            classes = sorted(found, key=lambda c: (_sort_number(c), c))
        return cls(tuple(features), label, None if regression or classes is None else tuple(classes),
                   tuple(float(m) for m in x.mean(axis=0)), tuple(float(s) if s > 0 else 1.0 for s in std), **keys)

    @property
    def fields(self) -> tuple[str, ...]:
        """The record fields this format reads."""
        return (*self.features, self.label)

    def encode(self, records: RawRecords) -> dict[str, torch.Tensor]:
        """The task's batch from table rows; DataError naming the column and record that do not fit."""
        x = (_feature_matrix(records, self.features) - np.asarray(self.offset)) / np.asarray(self.scale)
        return {self.features_key: torch.from_numpy(x).to(_DTYPES[self.dtype]),
                self.label_key: _class_indices(records, self.label, self.classes, "label")}

    def placeholder(self, size: int) -> dict[str, torch.Tensor]:
        """``size`` records of zeros in this format's shape and dtypes (no record's values)."""
        label = torch.zeros(size, dtype=torch.float32 if self.classes is None else torch.long)
        return {self.features_key: torch.zeros(size, len(self.features), dtype=_DTYPES[self.dtype]),
                self.label_key: label}

    def _pb(self) -> pb.TableInput:
        return pb.TableInput(features=self.features, label=self.label, classes=self.classes or (),
                             offset=self.offset, scale=self.scale, features_key=self.features_key,
                             label_key=self.label_key, dtype=self.dtype)

    def to_pb(self) -> pb.InputFormat:
        """The wire form carried in ``Offer.input``."""
        return pb.InputFormat(table=self._pb())


def _sort_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


@dataclass(frozen=True)
class TextFormat:
    """The buyer's tokenizer and record fields for causal LM or sequence classification.

    Records are tokenized with truncation to ``max_length`` tokens and right-padded with ``pad_id``
    to ``max_length`` (attention_mask 0 there, so pads never count in a loss): the tensors' width is
    the format's, never the longest record's, so no shape the model sees (nor any error it raises
    about one) depends on a record's length; sellers cost text at ``max_length`` anyway.
    With ``label_field`` the batch has ``labels``: class indices of ``classes``, or floats without.
    """

    tokenizer_json: str
    max_length: int
    text_field: str = "text"
    label_field: str | None = None
    classes: tuple[str, ...] | None = None
    pad_id: int = 0
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(label_text(c) for c in self.classes))
        check_input_pb(pb.InputFormat(text=self._pb()))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, max_length: int, **kw: Any) -> TextFormat:
        """From a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (its ``backend_tokenizer``);
        ``pad_id`` defaults to the tokenizer's pad token, else its end-of-text token, else 0."""
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if "pad_id" not in kw:
            candidates = (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                          (backend.padding or {}).get("pad_id"))
            kw["pad_id"] = int(next((c for c in candidates if c is not None), 0))
        return cls(backend.to_str(), max_length, **kw)

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int | None = None, **kw: Any) -> TextFormat:
        """From a tokenizer saved with ``save_pretrained`` (a directory) or a bare ``tokenizer.json``.

        ``max_length`` defaults to the saved ``model_max_length`` when that is a real bound.
        """
        p = Path(path)
        if p.is_file():
            if not max_length:
                raise DataError(f"{p} is a bare tokenizer.json, which states no maximum length; pass max_length")
            try:
                return cls.from_tokenizer(parse_tokenizer(p.read_bytes()), max_length, **kw)
            except ProtocolError as exc:
                raise DataError(f"{p}: {exc}") from None
        if not (p / "tokenizer.json").is_file():
            raise DataError(f"{p} holds no tokenizer.json; save a fast tokenizer with save_pretrained({str(p)!r})")
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(p), local_files_only=True)
        if max_length is None and 0 < tok.model_max_length <= MAX_TEXT_LENGTH:
            max_length = int(tok.model_max_length)
        if not max_length:
            raise DataError(f"the tokenizer in {p} states no model_max_length; pass max_length")
        return cls.from_tokenizer(tok, max_length, **kw)

    @property
    def fields(self) -> tuple[str, ...]:
        """The record fields this format reads."""
        return (self.text_field,) if self.label_field is None else (self.text_field, self.label_field)

    def tokenizer(self) -> Any:
        """The parsed tokenizer, parsed once (ProtocolError if the serialization is not a tokenizers JSON)."""
        return self._parsed

    @cached_property
    def _parsed(self) -> Any:
        return parse_tokenizer(self.tokenizer_json.encode())

    def encode(self, records: RawRecords) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (and ``labels``) of every record, int64, right-padded."""
        texts = []
        for i, value in enumerate(records.column(self.text_field, "text")):
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f"record {i + 1} of {records.source} has {'no' if not isinstance(value, str) else 'an empty'} "
                    f"text in field {self.text_field!r}; drop it or fill it with the record's text"
                )
            texts.append(value)
        tok = self.tokenizer()
        tok.no_padding()
        tok.enable_truncation(self.max_length)
        try:
            encodings = tok.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        except _FATAL:
            raise
        except BaseException as exc:  # a panic of the Rust library too (see _FATAL)
            raise ProtocolError(f"the buyer's tokenizer failed on {records.source}: {str(exc)[:200]}") from None
        width = max(len(e.ids) for e in encodings)
        if width > self.max_length:  # tokenizers does not truncate below the special tokens' count
            raise ProtocolError(
                f"the buyer's tokenizer makes {width}-token records under max_length {self.max_length}: its special "
                "tokens alone exceed max_length; ask the buyer for a larger max_length"
            )
        if width == 0:
            raise DataError(f"the buyer's tokenizer turns every record of {records.source} into 0 tokens")
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, : len(e.ids)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.label_field is not None:
            batch["labels"] = _class_indices(records, self.label_field, self.classes, "label")
        return batch

    def placeholder(self, size: int) -> dict[str, torch.Tensor]:
        """``size`` records of ``max_length`` pad tokens, all attended (the widest input a record can
        give), with label 0: no record's values."""
        batch = {"input_ids": torch.full((size, self.max_length), self.pad_id, dtype=torch.long),
                 "attention_mask": torch.ones((size, self.max_length), dtype=torch.long)}
        if self.label_field is not None:
            batch["labels"] = torch.zeros(size, dtype=torch.float32 if self.classes is None else torch.long)
        return batch

    def _pb(self) -> pb.TextInput:
        return pb.TextInput(tokenizer_json=self.tokenizer_json.encode(), max_length=self.max_length,
                            text_field=self.text_field, label_field=self.label_field or "",
                            classes=self.classes or (), pad_id=self.pad_id,
                            add_special_tokens=self.add_special_tokens)

    def to_pb(self) -> pb.InputFormat:
        """The wire form carried in ``Offer.input``."""
        return pb.InputFormat(text=self._pb())


InputFormat = TableFormat | TextFormat


def parse_tokenizer(data: bytes) -> Any:
    """``tokenizers.Tokenizer`` from JSON bytes already bounded by :func:`check_input_pb`."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"the offer's tokenizer_json is not UTF-8 text ({exc}); send tokenizer.json as written "
                            "by Tokenizer.save or save_pretrained") from None
    except _FATAL:
        raise
    except BaseException as exc:  # a panic of the Rust library too (see _FATAL)
        raise ProtocolError(f"the offer's tokenizer_json is not a valid tokenizers serialization: {str(exc)[:200]}; "
                            "send tokenizer.json as written by Tokenizer.save or save_pretrained") from None


def _check_names(names: Sequence[str], what: str, limit: int) -> None:
    if len(names) > limit:
        raise ProtocolError(f"the input format lists {len(names)} {what}, above the {limit} a format may list")
    for name in names:
        if len(name) > MAX_NAME_CHARS:
            raise ProtocolError(f"the input format has a {what[:-1]} name of {len(name)} characters, above "
                                f"{MAX_NAME_CHARS}")


def check_input_pb(msg: pb.InputFormat) -> None:
    """Structural checks of an input format, before anything is allocated or parsed (linear time)."""
    kind = msg.WhichOneof("kind")
    if kind == "table":
        t = msg.table
        _check_names(t.features, "feature columns", MAX_FEATURES)
        _check_names(t.classes, "classes", MAX_CLASSES)
        _check_names([t.label, t.features_key, t.label_key], "fields", 3)
        if not t.features or not t.label:
            raise ProtocolError("the table input format needs at least one feature column and a label column")
        if len(t.offset) != len(t.features) or len(t.scale) != len(t.features):
            raise ProtocolError(
                f"the table input format has {len(t.features)} features but {len(t.offset)} offsets and "
                f"{len(t.scale)} scales; it needs one of each per feature"
            )
        _finite(t.offset, "offset")
        _finite(t.scale, "scale")
        if any(s == 0 for s in t.scale):
            raise ProtocolError("the table input format has a zero scale; every scale must be non-zero")
        if t.dtype not in _DTYPES:
            raise ProtocolError(f"the table input format's dtype {t.dtype[:20]!r} is not one of {sorted(_DTYPES)}")
        if not t.features_key or not t.label_key or t.features_key == t.label_key:
            raise ProtocolError("the table input format needs two distinct, non-empty batch keys")
        if len(set(t.classes)) != len(t.classes) or len(set(t.features)) != len(t.features):
            raise ProtocolError("the table input format lists a feature column or a class twice")
    elif kind == "text":
        t = msg.text
        if len(t.tokenizer_json) > MAX_TOKENIZER_BYTES:
            raise ProtocolError(
                f"the offer's tokenizer_json is {len(t.tokenizer_json)} bytes, above the {MAX_TOKENIZER_BYTES} "
                "bytes a tokenizer may take; it was not parsed"
            )
        if not t.tokenizer_json:
            raise ProtocolError("the text input format carries no tokenizer_json")
        if not 1 <= t.max_length <= MAX_TEXT_LENGTH:
            raise ProtocolError(f"the text input format's max_length {t.max_length} is outside [1, {MAX_TEXT_LENGTH}]")
        _check_names([t.text_field, t.label_field], "fields", 2)
        _check_names(t.classes, "classes", MAX_CLASSES)
        if not t.text_field:
            raise ProtocolError("the text input format names no text field")
        if t.classes and not t.label_field:
            raise ProtocolError("the text input format lists classes but no label field")
        if len(set(t.classes)) != len(t.classes):
            raise ProtocolError("the text input format lists a class twice")
    else:
        raise ProtocolError("the offer's input format is empty; it must be a table or a text format")


def format_from_pb(msg: pb.InputFormat) -> InputFormat:
    """The validated format of an Offer (the tokenizer stays unparsed until it is used)."""
    check_input_pb(msg)
    if msg.WhichOneof("kind") == "table":
        t = msg.table
        return TableFormat(tuple(t.features), t.label, tuple(t.classes) or None, tuple(t.offset), tuple(t.scale),
                           t.features_key, t.label_key, t.dtype)
    t = msg.text
    try:
        tokenizer_json = t.tokenizer_json.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"the offer's tokenizer_json is not UTF-8 text ({exc}); send tokenizer.json as written "
                            "by Tokenizer.save or save_pretrained") from None
    return TextFormat(tokenizer_json, t.max_length, t.text_field, t.label_field or None, tuple(t.classes) or None,
                      t.pad_id, t.add_special_tokens)


def check_fields(fmt: InputFormat, records: RawRecords) -> None:
    """DataError if ``records`` lack a field ``fmt`` reads (a schema check: no record's values).

    The error reaches a remote buyer before anything is charged, so it names only the field the
    buyer asked for: listing the others would hand out the seller's schema for free. The seller's
    log keeps the fields it has."""
    missing = [f for f in fmt.fields if f not in records.fields]
    if missing:
        log.warning("%s: an input format reads %s, which the records do not offer (they offer %s)",
                    records.source, [m[:40] for m in missing[:5]], sorted(records.fields))
        raise DataError(
            f"{records.source} offers no field {missing[0][:40]!r}; the buyer's input format reads it: ask the "
            "seller which fields it offers, or map yours onto them"
        )


def format_digest(msg: pb.InputFormat) -> bytes:
    """Identity of a format (sellers reuse the tensors they encoded for an identical format)."""
    return hashlib.sha256(msg.SerializeToString(deterministic=True)).digest()


def encode_records(fmt: InputFormat | None, records: RawRecords | Mapping[str, torch.Tensor]
                   ) -> Mapping[str, torch.Tensor]:
    """Tensors of ``records`` in ``fmt``; tensor datasets pass through unchanged."""
    if not isinstance(records, RawRecords):
        return records
    if fmt is None:
        raise DataError(f"{records.source} are raw records; give an input format (TableFormat or TextFormat) "
                        "that turns them into the task's tensors")
    return fmt.encode(records)
