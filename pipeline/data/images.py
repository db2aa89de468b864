"""Reading radiographs: PNG/JPEG/TIFF of any bit depth, JSRT's raw 12-bit .IMG and DICOM, as float32 in [0, 1]."""
from __future__ import annotations

import hashlib
import io
import math
import os
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image

from pipeline.errors import DataError

#: Larger images are refused before decoding (a 20000 x 20000 image would need 1.6 GB as float32).
MAX_PIXELS = 64_000_000

RAW_SUFFIXES = (".img",)
RAW_BITS = 12
DICOM_SUFFIXES = (".dcm", ".dicom")

INTERPOLATIONS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
}


def is_raw(path: os.PathLike) -> bool:
    return str(path).lower().endswith(RAW_SUFFIXES)


def is_dicom(path: os.PathLike) -> bool:
    return str(path).lower().endswith(DICOM_SUFFIXES)


def _pydicom(name: os.PathLike):
    try:
        import pydicom
    except ImportError:
        raise DataError(f"{name}: reading DICOM needs pydicom; install the extra: pip install "
                        "'resmtnet-pipeline[dicom]'") from None
    return pydicom


def _read_dicom(source, name: os.PathLike, pixels: bool):
    pydicom = _pydicom(name)
    try:
        return pydicom.dcmread(source, stop_before_pixels=not pixels, force=False)
    except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, ValueError, ... for damaged files
        raise DataError(f"{name}: not a readable DICOM file ({type(exc).__name__}: {exc}); replace or remove it, "
                        "or pass --skip-bad") from None


#: Divisors to years of an age's unit: DICOM's age string (PS3.5 AS: '058Y', '003M'; RSNA's files hold a bare
#: number, '51') and NIH's first release ('058Y').
AGE_UNITS = {"": 1, "Y": 1, "M": 12, "W": 52, "D": 365}


def _header_text(ds, keyword: str) -> str:
    """A header element's text as stored, unvalidated: a value that breaks its VR (RSNA's ages) is read without a
    warning per file."""
    element = ds.get_item(keyword)
    value = getattr(element, "value", None)
    if isinstance(value, bytes):
        value = value.decode("ascii", "ignore")
    return str(value or "").strip()


def dicom_header(path: os.PathLike) -> dict:
    """A DICOM file's size and the facts a data set keeps (age in years, sex, view, patient), from its header
    alone; a size above the pixel limit is refused here, before anything is decoded."""
    ds = _read_dicom(path, path, pixels=False)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise DataError(f"{path}: the DICOM header has no Rows / Columns (not an image?); replace or remove it")
    _check_pixels(int(cols), int(rows), path)
    age = _header_text(ds, "PatientAge").upper()
    number, unit = (age[:-1], age[-1]) if age[-1:].isalpha() and age[-1:] in AGE_UNITS else (age, "")
    return {"width": int(cols), "height": int(rows),
            "age": float(number) / AGE_UNITS[unit] if number.isdigit() else float("nan"),
            "sex": _header_text(ds, "PatientSex"), "view": _header_text(ds, "ViewPosition").upper() or None,
            "patient_id": _header_text(ds, "PatientID") or None}


def _decoder_available(ds) -> bool:
    """Whether pydicom has a working decoder for the file's transfer syntax (else a plug-in is missing)."""
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(ds.file_meta.TransferSyntaxUID).is_available)
    except (AttributeError, NotImplementedError, ValueError):  # no file meta, or a syntax pydicom never decodes
        return False


def decode_dicom(data: bytes, name: str) -> np.ndarray:
    """A DICOM image as grey float32 in [0, 1], in the order DICOM defines (PS3.3 C.11): the stored values
    through the Modality LUT (Rescale Slope / Intercept), then the VOI LUT, or else the first Window Center /
    Width (linear, C.11.2.1.2.1), or else the image's own min..max; MONOCHROME1 (bright = low values) is
    inverted last. Values stay float from the stored 12/16 bits until the resize; the first frame of a
    multi-frame file is used."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _read_dicom(io.BytesIO(data), name, pixels=True)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # missing decoder plug-in, truncated pixel data, ...
        fix = ("its decoder is missing: install the extra: pip install 'resmtnet-pipeline[dicom]'"
               if not _decoder_available(ds) else "the file is damaged or truncated: replace it or pass --skip-bad")
        raise DataError(f"{name}: cannot decode the DICOM pixel data ({type(exc).__name__}: {exc}); {fix}") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        stored = stored[0]
    if stored.ndim == 3:  # colour: as PIL's L conversion
        stored = stored[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if "VOILUTSequence" in ds:
        values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
        low, high = float(values.min()), float(values.max())
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        low, high = center - 0.5 - (max(width, 1.0) - 1) / 2, center - 0.5 + (max(width, 1.0) - 1) / 2
    else:
        low, high = float(values.min()), float(values.max())
    out = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(values)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out
    _check_pixels(out.shape[1], out.shape[0], name)
    return np.ascontiguousarray(out, dtype=np.float32)


def _first(value) -> float:
    """A DICOM number that may be multi-valued (several windows): the first."""
    from pydicom.multival import MultiValue

    return float(value[0]) if isinstance(value, (MultiValue, list, tuple)) else float(value)


def _raw_side(n_bytes: int, name: str) -> int:
    side = math.isqrt(n_bytes // 2)
    if n_bytes == 0 or side * side * 2 != n_bytes:
        raise DataError(f"{name}: a raw JSRT .IMG must hold a square of 16-bit pixels "
                        f"(2048 x 2048 = 8388608 bytes), but it has {n_bytes} bytes")
    return side


def _open_header(source, name: os.PathLike) -> Image.Image:
    """Open lazily (header only); _check_pixels then applies our own limit before anything is decoded.

    The commands turn PIL's own, larger decompression-bomb limit off at their entry (pipeline.runtime), so
    the error names the image's size; a library caller who kept PIL's limit gets PIL's refusal as a DataError.
    """
    try:
        return Image.open(source)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{name}: image above PIL's decompression-bomb limit ({exc}); downscale it first") from None


def probe_image(path: os.PathLike) -> Tuple[int, int]:
    """(width, height) from the header alone; a missing, empty or non-image file is a DataError."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    if size == 0:
        raise DataError(f"{path}: the image file is empty (0 bytes); replace or remove it")
    if is_raw(path):
        side = _raw_side(size, str(path))
        return side, side
    if is_dicom(path):
        header = dicom_header(path)
        return header["width"], header["height"]
    try:
        with _open_header(path, path) as img:
            width, height = img.size
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: not a readable image ({exc}); replace or remove it") from None
    _check_pixels(width, height, path)
    return width, height


def _check_pixels(width: int, height: int, name: os.PathLike) -> None:
    if width * height > MAX_PIXELS:
        raise DataError(f"{name}: image is {width} x {height} pixels, above the limit of "
                        f"{MAX_PIXELS // 1_000_000} megapixels; downscale it first")


def check_header(data: bytes, name: str) -> Image.Image:
    """Encoded image bytes opened from their header, within the pixel limit, not decoded yet: decode_image's first
    step, and all the loader's workers do for a JPEG left for the device's decoder."""
    try:
        img = _open_header(io.BytesIO(data), name)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataError(f"{name}: cannot decode image ({exc}); replace or remove it") from None
    _check_pixels(img.width, img.height, name)
    return img


def decode_raw(data: bytes, name: str) -> np.ndarray:
    """JSRT .IMG: headerless big-endian 16-bit words holding 12-bit values.

    JSRT's raw values grow with film density (dark on a display), so they are inverted to match the
    PNG copies, where bone is bright: intensity = 1 - v / 4095.
    """
    side = _raw_side(len(data), name)
    values = np.frombuffer(data, dtype=">u2").reshape(side, side) & ((1 << RAW_BITS) - 1)
    return 1.0 - values.astype(np.float32) / float((1 << RAW_BITS) - 1)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode image bytes to a 2-D float32 array in [0, 1] (grey; colour and alpha are dropped)."""
    if not data:
        raise DataError(f"{name}: the image file is empty (0 bytes); replace or remove it")
    if is_raw(name):
        return decode_raw(data, name)
    if is_dicom(name):
        return decode_dicom(data, name)
    img = check_header(data, name)
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataError(f"{name}: cannot decode image ({exc}); replace or remove it") from None
    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
    elif mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        scale = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
        arr = np.clip(arr, 0, None).astype(np.float32) / scale
    elif mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    else:
        if mode != "L":
            img = img.convert("L")
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return np.ascontiguousarray(arr, dtype=np.float32)


def pixel_sha256(pixels: np.ndarray) -> str:
    """The content hash of a decoded image (its values at 8 bits, and its shape): equal for the same picture stored
    as PNG, DICOM or another file, where the files' own hashes differ."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    if pixels.dtype != np.uint8:  # 8-bit values as decoded (a JPEG decoded by torchvision) are hashed as they are
        pixels = np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def read_image(path: os.PathLike) -> np.ndarray:
    """Read and decode one image file (see decode_image)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    return decode_image(data, str(path))


def resize(image: np.ndarray, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Resize a [0, 1] float image to size x size with PIL's antialiased filters (as torchvision's Resize)."""
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"unknown interpolation '{interpolation}'; use one of {', '.join(INTERPOLATIONS)}")
    if image.shape == (size, size):
        return image
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    out = img.resize((size, size), INTERPOLATIONS[interpolation])
    return np.asarray(out, dtype=np.float32)
