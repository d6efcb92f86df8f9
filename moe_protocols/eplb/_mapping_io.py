"""Saving and restoring an expert placement as JSON or safetensors (never pickle).

The file format is chosen by suffix:

``.json``
    ``{"format": "moe-protocols.placement", "version": 1, "num_logical_experts": E,
    "num_ranks": R, "num_nodes": N, "physical_to_logical_map": [[...], ...],
    "metadata": {"key": "value", ...}}``
``.safetensors``
    one int64 tensor ``physical_to_logical_map [layers, physical]``; the file's
    string metadata holds ``format``, ``version``, ``num_logical_experts``,
    ``num_ranks``, ``num_nodes`` (decimal strings) and ``metadata`` (a JSON object
    of strings).

Loading checks everything a placement must satisfy and raises a
:class:`~moe_protocols.errors.MappingError` naming the file and the field.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Protocol, cast

import attrs
import torch
from torch import Tensor

from moe_protocols._torch_typed import int_rows
from moe_protocols.errors import MappingError

from ._maps import validate_placement

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from typing import TypeGuard

__all__ = ["PLACEMENT_FORMAT", "PLACEMENT_VERSION", "Placement", "load_placement", "save_placement"]

PLACEMENT_FORMAT: Final = "moe-protocols.placement"
"""Value of the ``format`` field of every placement file."""
PLACEMENT_VERSION: Final = 1
"""Version of the placement file format this library writes and reads."""

_MAP_KEY: Final = "physical_to_logical_map"
_FIELDS: Final = frozenset(
    {"format", "version", "num_logical_experts", "num_ranks", "num_nodes", _MAP_KEY, "metadata"}
)
_OPTIONAL_FIELDS: Final = frozenset({"metadata"})
_SUFFIXES: Final = (".json", ".safetensors")


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_count(instance: Placement, attribute: attrs.Attribute[int], value: object) -> None:
    if not _is_count(value) or value < 1:
        raise MappingError(f"Placement.{attribute.name} must be an int >= 1, got {value!r}")


def _to_int64_cpu(value: object) -> object:
    # Integer tensors are copied to int64 on the CPU so a Placement never aliases
    # live EPLB state. Anything else passes through for the validator to reject
    # (a float or bool tensor is not silently turned into expert ids).
    if isinstance(value, Tensor) and not (
        value.dtype == torch.bool or value.is_floating_point() or value.is_complex()
    ):
        return value.detach().to(device="cpu", dtype=torch.int64, copy=True).contiguous()
    return value


def _frozen_metadata(value: object) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise MappingError(
            f"Placement.metadata must be a mapping of str to str, got {type(value).__name__}"
        )
    entries = cast("Mapping[object, object]", value)
    checked: dict[str, str] = {}
    for key, item in entries.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise MappingError(f"Placement.metadata must map str to str, got {key!r}: {item!r}")
        checked[key] = item
    return MappingProxyType(checked)


def _check_nodes(instance: Placement, attribute: attrs.Attribute[int], value: int) -> None:
    _positive_count(instance, attribute, value)
    if instance.num_ranks % value != 0:
        raise MappingError(
            f"Placement.num_nodes={value} must divide num_ranks={instance.num_ranks}"
        )


@attrs.frozen
class Placement:
    """A saved expert placement: which logical expert every physical slot of every layer holds.

    Validated on construction: ``physical_to_logical_map`` is ``[layers, physical]``
    with ids in ``[0, num_logical_experts)``, every expert has a replica in every
    layer, and the slots split evenly over ``num_ranks`` ranks (rank-major). The
    map is stored as an int64 CPU copy; placements compare equal when their maps
    and fields are equal.
    """

    physical_to_logical_map: Tensor = attrs.field(
        # The converter passes a non-tensor through for validate_placement to reject.
        converter=_to_int64_cpu,  # pyright: ignore[reportGeneralTypeIssues]  # returns object, see above
        eq=attrs.cmp_using(eq=torch.equal),
        hash=False,
    )
    """``[layers, physical]`` int64: slot ``p`` of layer ``l`` holds expert ``map[l, p]``."""
    num_logical_experts: int = attrs.field(validator=_positive_count)
    """Logical experts ``E`` of the model the placement is for."""
    num_ranks: int = attrs.field(default=1, validator=_positive_count)
    """EP ranks the slots are spread over; slot ``p`` lives on rank ``p // (P // R)``."""
    num_nodes: int = attrs.field(default=1, validator=_check_nodes)
    """Nodes the ranks were spread over when the placement was computed (informational)."""
    metadata: Mapping[str, str] = attrs.field(
        factory=dict[str, str], converter=_frozen_metadata, hash=False
    )
    """Free-form string annotations (model name, policy, date, ...)."""

    def __attrs_post_init__(self) -> None:
        # After the field validators, so the counts it relies on are known good.
        validate_placement(
            self.physical_to_logical_map,
            num_layers=None,
            num_logical=self.num_logical_experts,
            num_physical=None,
            num_ranks=self.num_ranks,
            num_nodes=self.num_nodes,
            what="Placement.physical_to_logical_map",
        )

    @property
    def num_layers(self) -> int:
        """MoE layers ``L``."""
        return int(self.physical_to_logical_map.shape[0])

    @property
    def num_physical_experts(self) -> int:
        """Physical slots ``P`` per layer."""
        return int(self.physical_to_logical_map.shape[1])


@attrs.frozen
class _Header:
    """The scalar fields of a placement file, type-checked."""

    num_logical_experts: int
    num_ranks: int
    num_nodes: int
    metadata: Mapping[str, str]


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise MappingError(
            f"placement file {str(path)!r}: unknown suffix {path.suffix!r}; use .json or "
            ".safetensors (pickle is never used)"
        )
    return suffix


def _header(placement: Placement) -> dict[str, object]:
    return {
        "format": PLACEMENT_FORMAT,
        "version": PLACEMENT_VERSION,
        "num_logical_experts": placement.num_logical_experts,
        "num_ranks": placement.num_ranks,
        "num_nodes": placement.num_nodes,
    }


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    # Write next to the target, then rename: a crash never leaves a half-written file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_placement(placement: Placement, path: str | os.PathLike[str]) -> None:
    """Write ``placement`` to ``path`` (``.json`` or ``.safetensors``), replacing any file there.

    Raises:
        MappingError: unknown suffix, missing safetensors package, or the file
            cannot be written.
    """
    target = Path(path)
    suffix = _suffix(target)
    try:
        if suffix == ".json":
            text = _json_text(placement)
            _write_atomically(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        else:
            save_file = _safetensors_save()
            header = {key: str(value) for key, value in _header(placement).items()}
            header["metadata"] = json.dumps(dict(placement.metadata), sort_keys=True)
            tensors = {_MAP_KEY: placement.physical_to_logical_map.contiguous()}
            _write_atomically(target, lambda tmp: save_file(tensors, str(tmp), header))
    except OSError as exc:
        raise MappingError(f"cannot write placement file {str(target)!r}: {exc}") from exc


def _json_text(placement: Placement) -> str:
    # One line per layer: readable and diffable even for 58 x 288 maps.
    lines = ["{"]
    lines += [
        f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in _header(placement).items()
    ]
    rows = int_rows(placement.physical_to_logical_map)
    lines.append(f"  {json.dumps(_MAP_KEY)}: [")
    lines.append(",\n".join(f"    {json.dumps(row)}" for row in rows))
    lines.append("  ],")
    lines.append(f'  "metadata": {json.dumps(dict(placement.metadata), sort_keys=True)}')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _safetensors_save() -> Callable[[dict[str, Tensor], str, dict[str, str]], None]:
    try:
        from safetensors.torch import save_file  # pyright: ignore[reportUnknownVariableType]  # bare PathLike
    except ImportError as exc:
        raise MappingError(
            "writing .safetensors placements needs the safetensors package "
            "(pip install 'moe-protocols[safetensors]')"
        ) from exc

    def save(tensors: dict[str, Tensor], filename: str, metadata: dict[str, str]) -> None:
        save_file(tensors, filename, metadata=metadata)

    return save


def load_placement(path: str | os.PathLike[str]) -> Placement:
    """Read and validate a placement written by :func:`save_placement` (or by hand).

    Raises:
        MappingError: the file cannot be read or parsed, or its format, version,
            a field's type, the map's shape, an id's range, an expert without
            replica, or the slots per rank are wrong; the message names the file
            and the field.
    """
    source = Path(path)
    suffix = _suffix(source)
    where = f"placement file {str(source)!r}"
    if suffix == ".json":
        fields, table = _read_json(source, where)
    else:
        fields, table = _read_safetensors(source, where)
    try:
        return Placement(
            physical_to_logical_map=table,
            num_logical_experts=fields.num_logical_experts,
            num_ranks=fields.num_ranks,
            num_nodes=fields.num_nodes,
            metadata=fields.metadata,
        )
    except MappingError as exc:
        raise MappingError(f"{where}: {exc}") from exc


def _read_json(source: Path, where: str) -> tuple[_Header, Tensor]:
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MappingError(f"cannot read {where}: {exc}") from exc
    try:
        document: object = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise MappingError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise MappingError(
            f"{where}: the top level must be a JSON object, got {type(document).__name__}"
        )
    document = cast("dict[str, object]", document)  # JSON object keys are strings
    unknown = sorted(set(document) - _FIELDS)
    if unknown:
        raise MappingError(f"{where}: unknown field(s) {unknown}; expected {sorted(_FIELDS)}")
    missing = sorted(_FIELDS - _OPTIONAL_FIELDS - set(document))
    if missing:
        raise MappingError(f"{where}: missing field(s) {missing}")
    _check_format(document["format"], document["version"], where)
    header = _Header(
        num_logical_experts=_json_count(
            document["num_logical_experts"], "num_logical_experts", where
        ),
        num_ranks=_json_count(document["num_ranks"], "num_ranks", where),
        num_nodes=_json_count(document["num_nodes"], "num_nodes", where),
        metadata=_string_object(document.get("metadata", {}), "field 'metadata'", where),
    )
    return header, _json_table(document[_MAP_KEY], where)


def _string_object(value: object, field: str, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise MappingError(f"{where}: {field} must be an object of strings, got {value!r}")
    result: dict[str, str] = {}
    for key, item in cast("dict[object, object]", value).items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise MappingError(
                f"{where}: {field} must be an object of strings, got {key!r}: {item!r}"
            )
        result[key] = item
    return result


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def _check_format(format_: object, version: object, where: str) -> None:
    if format_ != PLACEMENT_FORMAT:
        raise MappingError(f"{where}: field 'format' is {format_!r}, expected {PLACEMENT_FORMAT!r}")
    if version != PLACEMENT_VERSION or not _is_count(version):
        raise MappingError(
            f"{where}: field 'version' is {version!r}; this library reads version "
            f"{PLACEMENT_VERSION}"
        )


def _json_count(value: object, key: str, where: str) -> int:
    if not _is_count(value):
        raise MappingError(
            f"{where}: field {key!r} must be an integer, got {type(value).__name__} {value!r}"
        )
    return value


def _json_table(value: object, where: str) -> Tensor:
    field = f"{where}: field {_MAP_KEY!r}"
    if not isinstance(value, list) or not value:
        raise MappingError(f"{field} must be a non-empty list of rows (one per layer)")
    width: int | None = None
    for layer, row in enumerate(cast("list[object]", value)):
        if not isinstance(row, list):
            raise MappingError(
                f"{field}: row {layer} must be a list of expert ids, got {type(row).__name__}"
            )
        row = cast("list[object]", row)
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise MappingError(
                f"{field}: row {layer} has {len(row)} slots, row 0 has {width} (ragged rows)"
            )
        for slot, item in enumerate(row):
            if not _is_count(item):
                raise MappingError(
                    f"{field}: layer {layer}, slot {slot} must be an integer expert id, "
                    f"got {type(item).__name__} {item!r}"
                )
            if not -(2**63) <= item < 2**63:
                raise MappingError(f"{field}: layer {layer}, slot {slot}: {item} is out of range")
    return torch.tensor(value, dtype=torch.int64)


def _read_safetensors(source: Path, where: str) -> tuple[_Header, Tensor]:
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise MappingError(
            f"reading {where} needs the safetensors package "
            "(pip install 'moe-protocols[safetensors]')"
        ) from exc
    try:
        opened = cast(
            "AbstractContextManager[_SafetensorsFile]", safe_open(str(source), framework="pt")
        )
        with opened as handle:
            header = handle.metadata() or {}
            keys = list(handle.keys())
            if keys != [_MAP_KEY]:
                raise MappingError(
                    f"{where}: must hold exactly one tensor {_MAP_KEY!r}, holds {keys}"
                )
            table = handle.get_tensor(_MAP_KEY)
    except MappingError:
        raise
    except Exception as exc:
        # safetensors raises its own error types (and OSError) for unreadable files.
        raise MappingError(f"cannot read {where}: {type(exc).__name__}: {exc}") from exc
    unknown = sorted(set(header) - (_FIELDS - {_MAP_KEY}))
    if unknown:
        raise MappingError(f"{where}: unknown metadata field(s) {unknown}")
    missing = sorted(_FIELDS - _OPTIONAL_FIELDS - {_MAP_KEY} - set(header))
    if missing:
        raise MappingError(f"{where}: missing metadata field(s) {missing}")
    version = header["version"]
    _check_format(header["format"], _decimal(version, "version", where), where)
    try:
        metadata = json.loads(header.get("metadata", "{}"), parse_constant=_reject_constant)
    except ValueError as exc:
        raise MappingError(f"{where}: metadata field 'metadata' is not JSON: {exc}") from exc
    fields = _Header(
        num_logical_experts=_decimal(header["num_logical_experts"], "num_logical_experts", where),
        num_ranks=_decimal(header["num_ranks"], "num_ranks", where),
        num_nodes=_decimal(header["num_nodes"], "num_nodes", where),
        metadata=_string_object(metadata, "metadata field 'metadata'", where),
    )
    return fields, table


class _SafetensorsFile(Protocol):
    """What we read of an open safetensors file (its own stub leaves these untyped)."""

    def metadata(self) -> dict[str, str] | None: ...
    def keys(self) -> list[str]: ...
    def get_tensor(self, name: str) -> Tensor: ...


def _decimal(text: str, key: str, where: str) -> int:
    # At most 19 digits: anything longer cannot be a count that fits in int64.
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise MappingError(
            f"{where}: metadata field {key!r} must be a decimal integer, got {text!r}"
        )
    return int(text)
