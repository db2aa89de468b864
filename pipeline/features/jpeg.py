"""JPEG decoding by torchvision on the extraction device (`extract.decode: gpu`).

At the field's JPEG sizes (CheXpert, MIMIC-CXR-JPG: about 3000 x 2500) one CPU worker decodes and resizes about 7
images/s (README, `benchmarks/extract.py --decode`), far below a GPU's forward rate. With `extract.decode: gpu`
the loader's workers only read and hash a JPEG file and check its header; the main process decodes the batch's
JPEGs with `torchvision.io.decode_jpeg` on the extractor's device (nvjpeg on CUDA, libjpeg-turbo on a CPU: the
fallback where there is no GPU) and resizes them there with torch's antialiased filters. Other formats (PNG, DICOM,
JSRT's raw files) are decoded by the workers as before. The decoded 8-bit values equal PIL's for baseline JPEGs on
the CPU (both libjpeg-turbo) and may differ by a level on nvjpeg (on an H200 they were equal for 48 synthetic
JPEGs of 2500 px, benchmarks/gpu.py); torch's antialiased resize approximates PIL's, so
features agree with the PIL path to 1e-3 of their scale (tests/test_jpeg_decode.py; 1e-6 measured there), not
bit for bit: the entry's precision records the decoder (`cpu-fp32-tvjpeg`), and a killed run's batches resume only
under the decoder that made them (their provenance holds the precision), as with --amp.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.images import decode_image, pixel_sha256
from pipeline.errors import ConfigError, PipelineError

#: The first bytes of every JPEG file (SOI marker, then the next marker's 0xFF).
JPEG_MAGIC = b"\xff\xd8\xff"
#: PIL filter -> torch's antialiased filter of the same support (1e-5 of PIL's on a 1024 px image). Not 'nearest':
#: at ties (1024 -> 224 px: every 7th sample) torch and PIL pick neighbouring pixels.
TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic"}
#: What the entry's precision says about the decoder (`Extractor.precision`).
DECODER_TAG = "tvjpeg"


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


def resize_tensor(image: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """(H, W) uint8 -> (1, size, size) float32 in [0, 1], on the image's device, with torch's filter for the PIL
    filter `interpolation` (pipeline.data.images.resize's counterpart)."""
    x = image[None, None].float() / 255.0
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode=TORCH_MODES[interpolation], antialias=True, align_corners=False)
    return x[0]


def check_decode_gpu(interpolations: Sequence[str]) -> None:
    """extract.decode gpu resizes with torch's filters: only those that match PIL's."""
    bad = sorted(set(interpolations) - set(TORCH_MODES))
    if bad:
        raise ConfigError(f"extract.decode gpu resizes with torch's filters, which match PIL's for "
                          f"{' and '.join(TORCH_MODES)} but not for {', '.join(bad)}; set extract.interpolation to "
                          "bilinear or bicubic, or use --decode cpu")


def _decode_all(encoded: Sequence[bytes], device: torch.device) -> List[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
    return [t[0] for t in decode_jpeg(data, mode=ImageReadMode.GRAY, device=device)]


def _decode_one(data: bytes, name: str, device: torch.device) -> torch.Tensor:
    """One image: torchvision on the device, else (a JPEG it cannot read: 12-bit, CMYK, damaged) PIL on the CPU,
    whose DataError names the file."""
    try:
        return _decode_all([data], device)[0]
    except RuntimeError:
        pixels = decode_image(data, name)
        return torch.from_numpy(np.round(pixels * 255.0).astype(np.uint8)).to(device)


def decode_deferred(batch, paths: Sequence[str], sizes: Sequence[Tuple[int, str]], device: torch.device) -> None:
    """Decode a loader batch's deferred JPEG files (`batch.encoded`: position -> bytes) on `device` and place them
    among its images in row order, with their pixel hashes; an unreadable one becomes the batch's error for its
    row, as a worker's would."""
    at = sorted(batch.encoded)
    names = [paths[batch.rows[i]] for i in at]
    try:
        decoded = dict(zip(at, _decode_all([batch.encoded[i] for i in at], device)))
    except RuntimeError:  # one bad file fails the batched call: decode one by one to find it
        decoded = {}
        for i, name in zip(at, names):
            try:
                decoded[i] = _decode_one(batch.encoded[i], name, device)
            except PipelineError as exc:
                batch.errors[i] = str(exc)
    cpu_rows = [i for i, error in enumerate(batch.errors) if not error and i not in batch.encoded]
    cpu_index = {i: k for k, i in enumerate(cpu_rows)}
    images: Dict[Tuple[int, str], torch.Tensor] = {}
    for key in sizes:
        parts = [resize_tensor(decoded[i], *key) if i in decoded else batch.images[key][cpu_index[i]].to(device)
                 for i, error in enumerate(batch.errors) if not error]
        images[key] = torch.stack(parts) if parts else torch.zeros(0, 1, key[0], key[0], device=device)
    for i, image in decoded.items():
        batch.pixels[i] = pixel_sha256(image.cpu().numpy()).encode()
    batch.images = images
    batch.encoded = {}
