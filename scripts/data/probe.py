"""What the data check reads from an image file, within a memory bound whatever the file claims.

- `file_problem`: whether the path is a readable file at all (missing, broken link, link loop, folder, permission).
- `open_image`: a NIfTI file (nibabel) or a MetaImage (``.mhd`` + ``.raw``, `scripts.data.metaimage.open_metaimage`:
  a memory map of the ``.raw``) with its voxels left on disk; other MetaImage forms (``.mha``, compressed data) are
  read whole by ITK, as inference loads them.
- `read_header`: the image header (no voxels read), as an `ImageHeader` the checks can judge before anything
  the size of the volume is allocated.
- `read_voxel_stats`: NaN/Inf counts and the intensity range, read in slabs through nibabel's array proxy, so that a
  volume is never held whole.
- `voxel_free`: the training loader with its NIfTI and ``.mhd`` reading replaced by a stand-in of the same shape and
  metadata but no voxels, so that the real orientation and box-coordinate transforms run on any volume size (a
  ``.mha`` or compressed MetaImage is loaded by MONAI's ITK reader, for real).
- `diagnose`: a reading or loading exception as a problem code and one line of text.
"""

from __future__ import annotations

import copy
import errno
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
from monai.data import ITKReader, NibabelReader
from monai.transforms import Compose, LoadImaged
from monai.utils import ensure_tuple
from scripts.data.metaimage import MetaImageError, open_metaimage, read_metaimage_header
from scripts.data.rules import ImageHeader, VoxelStats
from scripts.errors import describe

__all__ = [
    "Diagnosis",
    "describe",
    "diagnose",
    "file_problem",
    "open_image",
    "read_header",
    "read_voxel_stats",
    "voxel_free",
]

SLAB_VOXELS = 2**23  # voxels read at a time: 32 MiB as float32, whatever the volume's size
COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
METAIMAGE_SUFFIXES = (".mhd", ".mha")


@dataclass(frozen=True)
class Diagnosis:
    """
    Why a file cannot be used.

    Args:
        problem: the report's problem code (``missing_file``, ``unreadable``, ``degenerate_affine``,
            ``transform_failed``).
        reason: a finer code (e.g. ``truncated_gzip``); ``""`` when the problem says it all.
        text: one line for people.
    """

    problem: str
    reason: str
    text: str


def file_problem(path: str) -> Diagnosis | None:
    """Why ``path`` is not a readable file (``None`` if it is), telling a symbolic-link loop from a missing file."""
    try:
        info = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return Diagnosis("unreadable", "symlink_loop", "symbolic link loop: the link leads back to itself")
        if os.path.islink(path):
            target = os.readlink(path)
            return Diagnosis("missing_file", "broken_symlink", f"symbolic link to {target}, which does not exist")
        if e.errno == errno.ENOENT:
            return Diagnosis("missing_file", "", "file does not exist")
        return Diagnosis("unreadable", "os_error", f"cannot be opened: {e.strerror}")
    if stat.S_ISDIR(info.st_mode):
        return Diagnosis("unreadable", "directory", "is a folder, not an image file")
    if not os.access(path, os.R_OK):
        return Diagnosis("unreadable", "permission_denied", "permission denied: the file cannot be read")
    return None


def open_image(path: str) -> nib.spatialimages.SpatialImage:
    """
    The nibabel image of ``path``: the header is read, the voxels stay on disk behind an array proxy (NIfTI) or a
    memory map (an uncompressed MetaImage ``.raw``); a ``.mha`` or compressed MetaImage is read whole by ITK. Raises
    `MetaImageError` for a MetaImage header or data file that cannot be used (a missing ``.raw``, one of the wrong
    size).
    """
    if not path.lower().endswith(METAIMAGE_SUFFIXES):
        # keep_file_open: successive slabs of a gzip file continue the decompression instead of restarting it
        return nib.load(path, keep_file_open=True)
    if path.lower().endswith(".mhd"):
        header = read_metaimage_header(path)
        if not header.compressed:
            image = open_metaimage(path)
            image.file_map["image"].filename = header.data_file  # the file read_header judges
            return image
    reader = ITKReader()  # the RAS affine inference's LoadImaged gives the file
    array, meta = reader.get_data(reader.read(path))
    image = nib.Nifti1Image(np.asarray(array), np.asarray(meta["affine"], dtype=np.float64))
    image.file_map["image"].filename = path
    return image


def read_header(image: nib.spatialimages.SpatialImage) -> ImageHeader:
    """The `ImageHeader` of an opened image (one whose voxels are in memory counts as a complete file)."""
    proxy = image.dataobj
    data_file = str(image.file_map["image"].filename)
    suffix = os.path.splitext(data_file)[1].lower()
    in_memory = isinstance(proxy, np.ndarray) and not isinstance(proxy, np.memmap)
    return ImageHeader(
        shape=tuple(int(s) for s in image.shape),
        dtype=np.dtype(image.get_data_dtype()),
        slope=float(getattr(proxy, "slope", 1.0)),
        inter=float(getattr(proxy, "inter", 0.0)),
        affine=np.asarray(image.affine, dtype=np.float64),
        data_file=data_file,
        data_offset=int(getattr(proxy, "offset", 0)),
        file_size=int(proxy.nbytes) if in_memory else os.path.getsize(data_file),
        compression=COMPRESSION.get(suffix, ""),
    )


def _slabs(image: nib.spatialimages.SpatialImage, slab_voxels: int) -> Iterator[np.ndarray]:
    """The voxels of a 3D image (or a 4D one with one volume) as float32 slabs along the third axis."""
    shape = image.shape
    plane = max(int(np.prod(shape[:2])) * int(np.prod(shape[3:])), 1)
    step = max(slab_voxels // plane, 1)
    for z in range(0, shape[2], step):
        # float32: the type training loads, so that a float64 value beyond its range counts as the Inf it becomes
        with np.errstate(over="ignore"):
            slab = np.asarray(image.dataobj[:, :, z : z + step], dtype=np.float32)
        yield slab


def read_voxel_stats(
    image: nib.spatialimages.SpatialImage, intensity_range: tuple[float, float] | None, slab_voxels: int = SLAB_VOXELS
) -> VoxelStats:
    """`VoxelStats` of every voxel of ``image``, read ``slab_voxels`` at a time; reading errors propagate."""
    stats = VoxelStats()
    for slab in _slabs(image, slab_voxels):
        stats.add(slab, intensity_range)
    return stats


class VoxelFreeNibabelReader(NibabelReader):
    """
    MONAI's `NibabelReader` (same header, affine and channel handling) whose voxels are a read-only zero tensor
    of the image's shape that takes no memory; the data check reads the real voxels in slabs instead.
    """

    def _get_array_data(self, img, filename):  # noqa: ANN001, ANN202 (MONAI's signature)
        return torch.zeros((), dtype=torch.uint8).expand(tuple(int(s) for s in img.shape))


class VoxelFreeMetaImageReader(VoxelFreeNibabelReader):
    """
    The same stand-in for an uncompressed ``.mhd``: its header through `scripts.data.metaimage.open_metaimage` (the
    RAS affine MONAI's `ITKReader` gives it), no voxels. Compressed ones are left to the readers after it (ITK).
    """

    def verify_suffix(self, filename) -> bool:  # noqa: ANN001 (MONAI's signature)
        names = [str(n) for n in ensure_tuple(filename)]
        return all(n.lower().endswith(".mhd") and not _compressed(n) for n in names)

    def read(self, data, **kwargs):  # noqa: ANN001, ANN003, ANN201 (MONAI's signature)
        self.filenames = ensure_tuple(data)
        images = [open_metaimage(str(n)) for n in self.filenames]
        return images if len(images) > 1 else images[0]


def _compressed(mhd: str) -> bool:
    """Whether a ``.mhd``'s data is compressed (``False`` when its header cannot be read: the reader will say why)."""
    try:
        return read_metaimage_header(mhd).compressed
    except MetaImageError:
        return False


def voxel_free(loader: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """
    ``loader`` (a `Compose`) with each `LoadImaged` reading NIfTI and uncompressed MetaImage files through
    `VoxelFreeNibabelReader` and `VoxelFreeMetaImageReader`, keeping their type (no float32 copy): the transforms
    after it (channel, orientation, boxes) run for real, on the header's shape and affine, and allocate at most one
    byte per voxel (where the orientation flips an axis). A loader that is not a `Compose` is returned as it is.
    """
    if not isinstance(loader, Compose):
        return loader
    transforms = []
    for t in loader.transforms:
        if isinstance(t, LoadImaged):
            t = copy.deepcopy(t)
            t.register(VoxelFreeNibabelReader())  # readers registered last are tried first
            t.register(VoxelFreeMetaImageReader())
            t._loader.dtype = None  # LoadImaged has no public setter; a float32 cast would allocate the volume
        transforms.append(t)
    return Compose(transforms)


def _exception_chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _looks_like_text(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(text) and all(c.isprintable() or c.isspace() for c in text)


def _metaimage_diagnosis(text: str, path: str) -> Diagnosis:
    """The `Diagnosis` of a `MetaImageError` on ``path``, its line without the path the report already names."""
    text = text.removeprefix(f"MetaImage {os.path.abspath(path)}: ")
    if "does not exist" in text:
        return Diagnosis("missing_file", "missing_data_file", text)
    if "bytes" in text and "needs" in text:
        return Diagnosis("unreadable", "size_mismatch", text)
    return Diagnosis("unreadable", "bad_metaimage", text)


def diagnose(e: BaseException, path: str) -> Diagnosis:
    """The `Diagnosis` of an exception raised while reading or loading ``path``, from its exception chain."""
    chain = list(_exception_chain(e))
    root = chain[-1]
    failed_in = next((str(x) for x in chain if str(x).startswith("applying transform")), "")
    for x in chain:
        text = str(x).splitlines()[0] if str(x) else type(x).__name__
        name = type(x).__name__
        if isinstance(x, MetaImageError):
            return _metaimage_diagnosis(text, path)
        if isinstance(x, np.linalg.LinAlgError) or "singular" in text.lower():
            return Diagnosis("degenerate_affine", "singular_affine", f"affine cannot be inverted ({text})")
        if isinstance(x, zlib.error) or name == "BadGzipFile" or "crc check failed" in text.lower():
            return Diagnosis("unreadable", "corrupt_gzip", f"corrupt gzip data ({text})")
        if isinstance(x, EOFError):
            return Diagnosis("unreadable", "truncated_gzip", "truncated gzip: the compressed stream ends early")
        if "not a gzip file" in text.lower():
            kind = "a text file" if _looks_like_text(path) else "not gzip data"
            return Diagnosis("unreadable", "not_gzip", f"not a NIfTI file: {kind} named .gz")
        if "empty file" in text.lower():
            return Diagnosis("unreadable", "empty_file", "empty file")
        if "cannot work out file type" in text.lower():
            kind = " (a text file)" if _looks_like_text(path) else ""
            return Diagnosis("unreadable", "not_nifti", f"not a NIfTI file{kind}")
        if "not enough data in file" in text.lower():  # nibabel's slicing of a short file
            return Diagnosis("unreadable", "truncated_nifti", "truncated NIfTI: fewer voxels than the header claims")
        if text.startswith("Expected") and "bytes" in text:
            return Diagnosis("unreadable", "truncated_nifti", f"truncated NIfTI: {text.replace(' from ', ' ').strip()}")
        if name in ("HeaderDataError", "ImageFileError", "WrapStructError"):
            return Diagnosis("unreadable", "not_nifti", f"not a valid NIfTI file ({text})")
    detail = describe(root)
    if "LoadImage" in failed_in or not failed_in:
        return Diagnosis("unreadable", "load_error", f"cannot be loaded: {detail}")
    transform = failed_in.split("<")[-1].split(" ")[0].rsplit(".", 1)[-1] if "<" in failed_in else failed_in
    return Diagnosis("transform_failed", "transform_error", f"{transform} failed: {detail}")
