"""MetaImage (``.mhd`` + ``.raw``, the LUNA16 download's format) headers, read without touching the voxels.

A MetaImage header is ``Key = Value`` text; ``ElementDataFile`` comes last and names the voxel file. The geometry:
world (LPS mm) = ``Offset + D @ (ElementSpacing * index)``, where ``TransformMatrix`` lists the 3x3 direction ``D``
column by column (column j: the LPS direction of index axis j), as ITK's MetaImageIO reads it. Voxels are stored x
fastest. ITK stays the reader of record for the voxels (`scripts.data.luna16_prepare` loads them with MONAI's
``ITKReader``); this module exists because a header check must name every problem before anything the size of the
volume is read, and because the data check (`scripts.data.probe`) reads an uncompressed ``.raw`` like a NIfTI
through `open_metaimage`, a memory map, never whole.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scripts.errors import UserError

__all__ = [
    "MetaImageError",
    "MetaImageHeader",
    "check_compressed_data",
    "is_oblique",
    "open_metaimage",
    "ras_affine",
    "read_metaimage_header",
]

CHUNK_BYTES = 1 << 22  # compressed data is checked this much at a time, in and out
HEADER_BYTES = 1 << 16  # a MetaImage header is a few hundred bytes; read no further looking for one
ELEMENT_TYPES = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG": "i4",  # MetaIO stores MET_LONG in 4 bytes
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}
REQUIRED_KEYS = ("NDims", "DimSize", "ElementType", "ElementDataFile")
TRUE_WORDS = {"true", "1", "yes"}
FALSE_WORDS = {"false", "0", "no"}
# MetaIO's alternative names for the same fields
ALIASES = {"Position": "Offset", "Origin": "Offset", "Rotation": "TransformMatrix", "Orientation": "TransformMatrix"}


class MetaImageError(UserError):
    """A MetaImage header or its data file cannot be used; the message is one line naming the ``.mhd``."""


@dataclass(frozen=True)
class MetaImageHeader:
    """
    What a MetaImage header says about its volume.

    Args:
        path: the ``.mhd`` file (absolute).
        data_file: the voxel file it names (absolute).
        shape: ``DimSize`` ``(x, y, z)``, x fastest in the file.
        spacing: ``ElementSpacing`` in mm.
        offset: ``Offset``: world position (LPS mm) of voxel ``(0, 0, 0)``.
        direction: 3x3; column j is the LPS direction of index axis j.
        dtype: the voxels' numpy type, byte order included.
        compressed: ``CompressedData`` (zlib).
        header_size: bytes to skip at the start of the data file (``HeaderSize``, 0 in LUNA16).
    """

    path: str
    data_file: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    offset: tuple[float, float, float]
    direction: np.ndarray
    dtype: np.dtype
    compressed: bool
    header_size: int = 0


def _fields(path: str) -> dict[str, str]:
    """The header's ``Key = Value`` pairs up to ``ElementDataFile`` (the last one), aliases renamed."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise MetaImageError(f"MetaImage {path}: cannot be read ({e.strerror}); check the path") from None
    fields: dict[str, str] = {}
    for line in raw.decode("latin-1").splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            if fields:
                break  # binary data after the header (a .mha); the header is over
            raise MetaImageError(f"MetaImage {path}: not a MetaImage header (line {line[:40]!r}); give the .mhd file")
        fields[ALIASES.get(key, key)] = value.strip()
        if key == "ElementDataFile":
            break
    if not fields or ("NDims" not in fields and "ObjectType" not in fields):
        raise MetaImageError(f"MetaImage {path}: not a MetaImage header (no NDims or ObjectType); give the .mhd file")
    if fields.get("ObjectType", "Image") != "Image":
        raise MetaImageError(f"MetaImage {path}: ObjectType is {fields['ObjectType']}, not Image")
    return fields


def _numbers(
    path: str, fields: dict[str, str], key: str, count: int, default: list[float] | None = None
) -> list[float]:
    if key not in fields:
        if default is None:
            raise MetaImageError(f"MetaImage {path}: the header has no {key}; it is required")
        return default
    try:
        values = [float(v) for v in fields[key].split()]
    except ValueError:
        values = []
    if len(values) != count:
        raise MetaImageError(f"MetaImage {path}: {key} = {fields[key]!r}; expected {count} numbers")
    return values


def _flag(path: str, fields: dict[str, str], key: str) -> bool:
    value = fields.get(key, "False").lower()
    if value not in TRUE_WORDS | FALSE_WORDS:
        raise MetaImageError(f"MetaImage {path}: {key} = {fields[key]!r}; expected True or False")
    return value in TRUE_WORDS


def read_metaimage_header(path: str) -> MetaImageHeader:
    """
    Read and check a MetaImage header (no voxels are read).

    Args:
        path: the ``.mhd`` file.

    Returns:
        The header, its data file and direction checked.

    Raises:
        MetaImageError: not a MetaImage, ``NDims`` other than 3, a required key missing or a value not understood,
            ``LOCAL`` or listed data files (unsupported), the data file missing, an uncompressed data file whose size
            is not ``prod(DimSize) * itemsize``, a non-finite or non-positive spacing, or a singular direction.
    """
    path = os.path.abspath(path)
    fields = _fields(path)
    missing = [k for k in REQUIRED_KEYS if k not in fields]
    if missing:
        raise MetaImageError(f"MetaImage {path}: the header lacks {', '.join(missing)}; it is not a complete .mhd")
    if fields["NDims"] != "3":
        raise MetaImageError(f"MetaImage {path}: NDims = {fields['NDims']}; only 3D volumes are supported")
    if fields.get("ElementNumberOfChannels", "1") != "1":
        raise MetaImageError(f"MetaImage {path}: {fields['ElementNumberOfChannels']} channels; only 1 is supported")
    dims = _numbers(path, fields, "DimSize", 3)
    if any(d < 1 or d != int(d) for d in dims):
        raise MetaImageError(f"MetaImage {path}: DimSize = {fields['DimSize']!r}; expected 3 positive integers")
    shape = tuple(int(d) for d in dims)
    spacing = _numbers(path, fields, "ElementSpacing", 3, default=_numbers(path, fields, "ElementSize", 3, [1.0] * 3))
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise MetaImageError(f"MetaImage {path}: ElementSpacing = {fields.get('ElementSpacing')!r}; must be > 0 mm")
    offset = _numbers(path, fields, "Offset", 3, [0.0] * 3)
    matrix = _numbers(path, fields, "TransformMatrix", 9, [1.0, 0, 0, 0, 1, 0, 0, 0, 1])
    direction = np.asarray(matrix, dtype=np.float64).reshape(3, 3).T  # listed column by column
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise MetaImageError(f"MetaImage {path}: TransformMatrix = {fields.get('TransformMatrix')!r} is singular")
    kind = ELEMENT_TYPES.get(fields["ElementType"])
    if kind is None:
        raise MetaImageError(
            f"MetaImage {path}: ElementType {fields['ElementType']} is not one of {', '.join(ELEMENT_TYPES)}"
        )
    msb = _flag(path, fields, "ElementByteOrderMSB") or _flag(path, fields, "BinaryDataByteOrderMSB")
    dtype = np.dtype(kind).newbyteorder(">" if msb else "<")
    compressed = _flag(path, fields, "CompressedData")
    name = fields["ElementDataFile"]
    if name.upper() in ("LOCAL", "LIST") or "%" in name or " " in name.strip():
        raise MetaImageError(
            f"MetaImage {path}: ElementDataFile = {name}; unsupported (only a separate .raw file is); "
            "convert it with ITK to .mhd + .raw"
        )
    data_file = os.path.join(os.path.dirname(path), name)
    if not os.path.isfile(data_file):
        raise MetaImageError(f"MetaImage {path}: its data file {data_file} does not exist; copy the .raw next to it")
    header_size = int(_numbers(path, fields, "HeaderSize", 1, [0.0])[0])
    if header_size < 0:
        raise MetaImageError(f"MetaImage {path}: HeaderSize = {header_size}; only a fixed size (>= 0) is supported")
    if not compressed:
        expected = header_size + int(np.prod(shape)) * dtype.itemsize
        actual = os.path.getsize(data_file)
        if actual != expected:
            raise MetaImageError(
                f"MetaImage {path}: {os.path.basename(data_file)} has {actual} bytes, DimSize {shape} of "
                f"{fields['ElementType']} needs {expected}; the .raw is truncated or belongs to another scan"
            )
    return MetaImageHeader(
        path=path,
        data_file=data_file,
        shape=shape,  # type: ignore[arg-type]
        spacing=tuple(spacing),  # type: ignore[arg-type]
        offset=tuple(offset),  # type: ignore[arg-type]
        direction=direction,
        dtype=dtype,
        compressed=compressed,
        header_size=header_size,
    )


def ras_affine(header: MetaImageHeader) -> np.ndarray:
    """The 4x4 NIfTI-style affine (index -> RAS mm) of a MetaImage: ``diag(-1, -1, 1, 1) @ [[D S, o], [0, 1]]``."""
    lps = np.eye(4)
    lps[:3, :3] = header.direction * np.asarray(header.spacing)[None, :]
    lps[:3, 3] = header.offset
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def is_oblique(direction: np.ndarray, tolerance: float = 1e-3) -> bool:
    """Whether a 3x3 direction is not a signed permutation (each column one axis, +-1) within ``tolerance``."""
    d = np.abs(np.asarray(direction, dtype=np.float64))
    near_one = np.abs(d - 1.0) < tolerance
    near_zero = d < tolerance
    axis_like = np.all(near_one | near_zero) and np.all(near_one.sum(axis=0) == 1) and np.all(near_one.sum(axis=1) == 1)
    return not bool(axis_like)


def check_compressed_data(header: MetaImageHeader) -> None:
    """
    Check that compressed voxel data inflates to exactly ``prod(DimSize) * itemsize`` bytes, streaming (no volume is
    held). ITK only prints "Uncompress failed" for corrupt data and returns a volume anyway, so this check is ours.

    Raises:
        MetaImageError: the data is not a zlib/gzip stream, is truncated, or inflates to another size.
    """
    expected = int(np.prod(header.shape)) * header.dtype.itemsize
    inflate = zlib.decompressobj(wbits=47)  # zlib or gzip header, as ITK accepts
    total = 0
    try:
        with open(header.data_file, "rb") as f:
            f.seek(header.header_size)
            while chunk := f.read(CHUNK_BYTES):
                total += len(inflate.decompress(chunk, CHUNK_BYTES))
                while inflate.unconsumed_tail:
                    total += len(inflate.decompress(inflate.unconsumed_tail, CHUNK_BYTES))
        total += len(inflate.flush())
    except zlib.error as e:
        raise MetaImageError(
            f"MetaImage {header.path}: its compressed data is corrupt ({e}); download it again"
        ) from None
    if not inflate.eof or total != expected:
        raise MetaImageError(
            f"MetaImage {header.path}: its compressed data inflates to {total} bytes, DimSize {header.shape} needs "
            f"{expected}; the file is truncated or belongs to another scan"
        )


def open_metaimage(path: str) -> nib.Nifti1Image:
    """
    An uncompressed MetaImage as a nibabel image: its data a read-only memory map of the ``.raw`` (``(x, y, z)``),
    its affine `ras_affine`; nothing is read until sliced.

    Raises:
        MetaImageError: as `read_metaimage_header`, or the data is compressed (read it with ITK instead).
    """
    header = read_metaimage_header(path)
    if header.compressed:
        raise MetaImageError(
            f"MetaImage {header.path}: CompressedData = True cannot be memory-mapped; read it with ITK"
        )
    data = np.memmap(header.data_file, dtype=header.dtype, mode="r", offset=header.header_size, shape=header.shape,
                     order="F")  # fmt: skip
    return nib.Nifti1Image(data, ras_affine(header))
