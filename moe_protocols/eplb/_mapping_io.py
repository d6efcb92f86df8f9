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
:class:`~moe_protocols.errors.PlacementFileError` (a ``MappingError``) naming
the file and the field. Reading is bounded: regular files only, at most
``max_bytes`` (16 MiB by default), JSON nested at most ``MAX_JSON_DEPTH``
levels, maps within the size limits of :mod:`moe_protocols.eplb._limits`, and
safetensors read from memory, never mapped.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

import attrs
import torch
from torch import Tensor

from moe_protocols._torch_typed import int_rows
from moe_protocols.errors import MappingError, PlacementFileError

from . import _limits

# Placement: importable from here, where users and tests found it.
from ._placement import Placement, is_count

if TYPE_CHECKING:
    pass

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
        PlacementFileError: ``placement`` is not a valid :class:`Placement`, ``path``
            is not a ``str``/``PathLike``, unknown suffix, missing safetensors
            package, or the file cannot be written.
    """
    target = _path(path)
    with _as_file_error(target):
        _save(_checked_placement(placement, target), target)


def _checked_placement(placement: object, target: Path) -> Placement:
    """``placement`` re-validated from its fields (the type is never asked)."""
    names = ("physical_to_logical_map", "num_logical_experts", "num_ranks", "num_nodes")
    try:
        fields = {name: getattr(placement, name) for name in names}
        fields["metadata"] = getattr(placement, "metadata", {})
    except Exception as exc:
        raise PlacementFileError(
            f"save_placement({str(target)!r}): expected a Placement, got "
            f"{type(placement).__name__} ({type(exc).__name__}: {exc}); build one with "
            "Placement(physical_to_logical_map=..., num_logical_experts=...)",
            path=str(target),
        ) from exc
    return Placement(**fields)


def _save(placement: Placement, target: Path) -> None:
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


def _path(path: object) -> Path:
    """``path`` as a ``Path``; anything but a ``str`` or ``os.PathLike[str]`` is refused."""
    if isinstance(path, str):
        text = path
    elif callable(getattr(type(path), "__fspath__", None)):  # os.PathLike, structurally
        try:
            text = os.fspath(cast("os.PathLike[str]", path))
        except Exception as exc:
            raise PlacementFileError(
                f"placement path {type(path).__name__}: os.fspath() raised {exc!r}", path=None
            ) from exc
        if not isinstance(text, str):  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
            raise PlacementFileError(
                f"placement path must name a file by a str, got {type(text).__name__} {text!r}",
                path=None,
            )
    else:
        raise PlacementFileError(
            f"placement path must be a str or os.PathLike, got {type(path).__name__} {path!r}",
            path=None,
        )
    if not text or "\x00" in text:
        raise PlacementFileError(f"placement path {text!r} names no file", path=text)
    return Path(text)


@contextlib.contextmanager
def _as_file_error(source: Path) -> Generator[None, None, None]:
    """Turn every ``MappingError`` raised inside into a ``PlacementFileError`` naming ``source``."""
    try:
        yield
    except PlacementFileError:
        raise
    except MappingError as exc:
        raise PlacementFileError(str(exc), path=str(source)) from exc


def load_placement(
    path: str | os.PathLike[str], *, max_bytes: int = _limits.MAX_PLACEMENT_FILE_BYTES
) -> Placement:
    """Read and validate a placement written by :func:`save_placement` (or by hand).

    The file is read whole into memory (never memory-mapped, so a concurrent
    writer cannot pull pages away) and only when it is a regular file of at
    most ``max_bytes`` bytes (default 16 MiB, ``MAX_PLACEMENT_FILE_BYTES``);
    a FIFO, device or directory is refused without blocking. JSON may nest at
    most ``MAX_JSON_DEPTH`` levels and hold no more arrays and values than a
    map within ``MAX_LAYERS``/``MAX_MAP_ENTRIES`` needs, checked in linear
    time before it is parsed.

    Raises:
        PlacementFileError: (a ``MappingError``) ``path`` is not a ``str`` or
            ``PathLike``; the file is not a regular file, too large, cannot be
            read or parsed, nests too deep; or its format, version, a field's
            type, the map's shape, an id's range, an expert without replica, or
            the slots per rank are wrong. The message names the file and the
            field; ``path`` carries the file.
    """
    source = _path(path)
    if (
        isinstance(max_bytes, bool)
        or not isinstance(max_bytes, int)  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
        or max_bytes < 1
    ):
        raise PlacementFileError(
            f"load_placement({str(source)!r}): max_bytes must be an int >= 1, got {max_bytes!r}",
            path=str(source),
        )
    with _as_file_error(source):
        return _load(source, max_bytes)


def _load(source: Path, max_bytes: int) -> Placement:
    suffix = _suffix(source)
    where = f"placement file {str(source)!r}"
    data = _read_bounded(source, where, max_bytes)
    if suffix == ".json":
        fields, table = _read_json(data, where)
    else:
        fields, table = _read_safetensors(data, where)
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


def _read_bounded(source: Path, where: str, max_bytes: int) -> bytes:
    """The whole file, if it is a regular file of at most ``max_bytes`` bytes.

    Opened without blocking (a FIFO with no writer would block an ordinary
    open), then checked on the open descriptor, so the file checked is the
    file read; read to at most ``max_bytes + 1`` bytes in case it grows.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(source, flags)
    except OSError as exc:
        raise MappingError(f"cannot read {where}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MappingError(
                f"cannot read {where}: it is {_file_kind(info.st_mode)}, not a regular file"
            )
        if info.st_size > max_bytes:
            raise MappingError(_too_large(where, info.st_size, max_bytes))
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, min(max_bytes + 1 - size, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise MappingError(f"cannot read {where}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if size > max_bytes:
        raise MappingError(_too_large(where, size, max_bytes))
    return b"".join(chunks)


def _too_large(where: str, size: int, max_bytes: int) -> str:
    return (
        f"{where} holds {size} bytes or more, over the limit of {max_bytes} bytes; pass "
        "load_placement(..., max_bytes=) to read a larger one"
    )


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


_STRUCTURE_CHUNK: Final = 1 << 20
_BACKSLASH, _QUOTE, _COMMA = ord("\\"), ord('"'), ord(",")


@attrs.define
class _Structure:
    """Running totals of a JSON text's structure outside strings, scanned chunk by chunk."""

    depth: int = 0
    deepest: int = 0
    containers: int = 0
    commas: int = 0
    in_string: int = 0
    backslashes: int = 0  # the run of backslashes that ended the previous chunk

    def scan(self, chunk: Tensor) -> None:
        """Add ``chunk`` (uint8) to the totals; vectorised, so linear in time and memory."""
        n = chunk.numel()
        positions = torch.arange(n)
        is_backslash = chunk == _BACKSLASH
        # The last index before each position that is no backslash (the carried
        # run counts as backslashes before index 0); a quote after an odd run is escaped.
        marker = torch.where(is_backslash, -1 - self.backslashes, positions).cummax(0).values
        before = torch.cat([torch.tensor([-1 - self.backslashes]), marker[:-1]])
        escaped = (positions - 1 - before) % 2 == 1
        quotes = (chunk == _QUOTE) & ~escaped
        seen = quotes.to(torch.int32).cumsum(0)
        outside = (seen + self.in_string) % 2 == 0
        outside &= ~quotes
        opens = ((chunk == ord("[")) | (chunk == ord("{"))) & outside
        closes = ((chunk == ord("]")) | (chunk == ord("}"))) & outside
        running = (opens.to(torch.int32) - closes.to(torch.int32)).cumsum(0) + self.depth
        self.deepest = max(self.deepest, int(running.max()))
        self.depth = int(running[-1])
        self.containers += int(opens.sum())
        self.commas += int(((chunk == _COMMA) & outside).sum())
        self.in_string = (self.in_string + int(seen[-1])) % 2
        last = int(marker[-1])
        self.backslashes = (n - 1 - last) if bool(is_backslash[-1]) else 0


def _check_structure(data: bytes, where: str) -> None:
    """Refuse JSON too deep or too big for a placement, before ``json.loads`` builds it.

    Nesting beyond ``MAX_JSON_DEPTH`` (``json.loads`` recurses per level),
    more arrays and objects than a map of ``MAX_LAYERS`` rows needs, or more
    values than ``MAX_MAP_ENTRIES`` (each a Python object once parsed).
    Brackets and commas inside strings do not count.
    """
    totals = _Structure()
    for start in range(0, len(data), _STRUCTURE_CHUNK):
        piece = bytearray(data[start : start + _STRUCTURE_CHUNK])
        totals.scan(torch.frombuffer(piece, dtype=torch.uint8))
        if totals.deepest > _limits.MAX_JSON_DEPTH:
            raise MappingError(
                f"{where} nests deeper than {_limits.MAX_JSON_DEPTH} levels; a placement "
                "needs 3 (MAX_JSON_DEPTH in moe_protocols.eplb.limits)"
            )
    most_containers = _limits.MAX_LAYERS + 16
    most_values = _limits.MAX_MAP_ENTRIES + 1024
    if totals.containers > most_containers or totals.commas > most_values:
        raise MappingError(
            f"{where} holds {totals.containers} arrays and objects and {totals.commas + 1} "
            f"values or more; a placement within the limits (MAX_LAYERS={_limits.MAX_LAYERS}, "
            f"MAX_MAP_ENTRIES={_limits.MAX_MAP_ENTRIES}) has at most {most_containers} and "
            f"{most_values}"
        )


def _parse_json(data: bytes, where: str) -> object:
    _check_structure(data, where)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MappingError(f"cannot read {where}: not UTF-8 text ({exc})") from exc
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise MappingError(f"{where} is not valid JSON: {exc}") from exc


def _read_json(data: bytes, where: str) -> tuple[_Header, Tensor]:
    document = _parse_json(data, where)
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
    if version != PLACEMENT_VERSION or not is_count(version):
        raise MappingError(
            f"{where}: field 'version' is {version!r}; this library reads version "
            f"{PLACEMENT_VERSION}"
        )


def _json_count(value: object, key: str, where: str) -> int:
    if not is_count(value):
        raise MappingError(
            f"{where}: field {key!r} must be an integer, got {type(value).__name__} {value!r}"
        )
    return value


def _json_table(value: object, where: str) -> Tensor:
    field = f"{where}: field {_MAP_KEY!r}"
    if not isinstance(value, list) or not value:
        raise MappingError(f"{field} must be a non-empty list of rows (one per layer)")
    value = cast("list[object]", value)
    _limits.check_count(f"{field}: layers", len(value), "MAX_LAYERS", MappingError)
    width: int | None = None
    for layer, row in enumerate(value):
        if not isinstance(row, list):
            raise MappingError(
                f"{field}: row {layer} must be a list of expert ids, got {type(row).__name__}"
            )
        row = cast("list[object]", row)
        if width is None:
            width = len(row)
            _limits.check_count(f"{field}: slots", width, "MAX_PHYSICAL_SLOTS", MappingError)
        elif len(row) != width:
            raise MappingError(
                f"{field}: row {layer} has {len(row)} slots, row 0 has {width} (ragged rows)"
            )
    for layer, row in enumerate(cast("list[list[object]]", value)):  # rows checked above
        for slot, item in enumerate(row):
            if not is_count(item):
                raise MappingError(
                    f"{field}: layer {layer}, slot {slot} must be an integer expert id, "
                    f"got {type(item).__name__} {item!r}"
                )
            if not -(2**63) <= item < 2**63:
                raise MappingError(f"{field}: layer {layer}, slot {slot}: {item} is out of range")
    return torch.tensor(value, dtype=torch.int64)


def _read_safetensors(data: bytes, where: str) -> tuple[_Header, Tensor]:
    try:
        from safetensors.torch import load as load_tensors
    except ImportError as exc:
        raise MappingError(
            f"reading {where} needs the safetensors package "
            "(pip install 'moe-protocols[safetensors]')"
        ) from exc
    header = _safetensors_header(data, where)
    try:
        # From the bytes already read: no memory map a concurrent writer could truncate.
        table = load_tensors(data)[_MAP_KEY]
    except Exception as exc:
        # safetensors raises its own error types for malformed files.
        raise MappingError(f"cannot read {where}: {type(exc).__name__}: {exc}") from exc
    unknown = sorted(set(header) - (_FIELDS - {_MAP_KEY}))
    if unknown:
        raise MappingError(f"{where}: unknown metadata field(s) {unknown}")
    missing = sorted(_FIELDS - _OPTIONAL_FIELDS - {_MAP_KEY} - set(header))
    if missing:
        raise MappingError(f"{where}: missing metadata field(s) {missing}")
    version = header["version"]
    _check_format(header["format"], _decimal(version, "version", where), where)
    notes = header.get("metadata", "{}")
    _check_structure(notes.encode("utf-8"), f"{where}: metadata field 'metadata'")
    try:
        metadata = json.loads(notes, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise MappingError(f"{where}: metadata field 'metadata' is not JSON: {exc}") from exc
    fields = _Header(
        num_logical_experts=_decimal(header["num_logical_experts"], "num_logical_experts", where),
        num_ranks=_decimal(header["num_ranks"], "num_ranks", where),
        num_nodes=_decimal(header["num_nodes"], "num_nodes", where),
        metadata=_string_object(metadata, "metadata field 'metadata'", where),
    )
    return fields, table


def _safetensors_header(data: bytes, where: str) -> dict[str, str]:
    """The string metadata of a safetensors file, after checking its one tensor's entry.

    The format: 8 bytes little-endian header length, the JSON header, the data.
    The tensor's shape is checked here, so nothing is allocated for a map
    over the size limits.
    """
    if len(data) < 8:
        raise MappingError(f"cannot read {where}: {len(data)} bytes is no safetensors file")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise MappingError(
            f"cannot read {where}: its header claims {length} bytes, the file holds "
            f"{len(data) - 8} after the length"
        )
    document = _parse_json(data[8 : 8 + length], f"{where} (safetensors header)")
    if not isinstance(document, dict):
        raise MappingError(f"cannot read {where}: the safetensors header is not a JSON object")
    document = cast("dict[str, object]", document)  # JSON object keys are strings
    keys = sorted(key for key in document if key != "__metadata__")
    if keys != [_MAP_KEY]:
        raise MappingError(f"{where}: must hold exactly one tensor {_MAP_KEY!r}, holds {keys}")
    entry = document[_MAP_KEY]
    shape = cast("dict[str, object]", entry).get("shape") if isinstance(entry, dict) else None
    dims = cast("list[object]", shape) if isinstance(shape, list) else []
    if len(dims) != 2 or not all(is_count(n) and n >= 0 for n in dims):
        raise MappingError(
            f"{where}: tensor {_MAP_KEY!r}: expected 2 dimensions [layers, physical], "
            f"got shape {shape!r}"
        )
    layers, slots = cast("list[int]", dims)  # two counts, checked above
    field = f"{where}: tensor {_MAP_KEY!r}"
    _limits.check_count(f"{field}: layers", layers, "MAX_LAYERS", MappingError)
    _limits.check_count(f"{field}: slots", slots, "MAX_PHYSICAL_SLOTS", MappingError)
    _limits.check_product(field, (layers, slots), "MAX_MAP_ENTRIES", MappingError)
    metadata = document.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise MappingError(f"{where}: the safetensors metadata must map strings to strings")
    strings: dict[str, str] = {}
    for key, value in cast("dict[object, object]", metadata).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise MappingError(f"{where}: the safetensors metadata must map strings to strings")
        strings[key] = value
    return strings


def _decimal(text: str, key: str, where: str) -> int:
    # At most 19 digits: anything longer cannot be a count that fits in int64.
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise MappingError(
            f"{where}: metadata field {key!r} must be a decimal integer, got {text!r}"
        )
    return int(text)
