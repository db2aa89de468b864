"""Running frozen backbones over image files: a DataLoader that decodes, hashes and resizes in worker
processes, and an extractor that normalises per backbone and runs the forward passes.

Used by stage one (into the cache) and by `predict` (new images), so both see the same preprocessing.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cache import EntryKey

from pipeline.config import SpatialConfig
from pipeline.data.images import check_header, decode_image, pixel_sha256, resize
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.features.backbones import BackboneInfo, check_offline_weights, create_backbone, spatial_backbone
from pipeline.features.jpeg import DECODER_TAG, check_decode_gpu, decode_deferred, is_jpeg
from pipeline.features.preprocess import Preprocess, make_preprocess, normalise, provenance_sha256

logger = logging.getLogger(__name__)


@dataclass
class ImageItem:
    row: int
    images: Dict[Tuple[int, str], np.ndarray]  # (size, interpolation) -> (S, S) float32
    sha256: str
    pixels: str  # pixel_sha256 of the decoded image ('' when unreadable)
    size_bytes: int
    mtime_ns: int
    error: str  # '' when the image was read
    encoded: Optional[bytes] = None  # a JPEG file left for the device to decode (extract.decode: gpu)


class ImageFiles(Dataset):
    """Reads each file once: stat, content hash and decode come from the same bytes; with `defer_jpeg` a JPEG's
    header is checked and its bytes are passed on undecoded (pipeline.features.jpeg decodes them on the device)."""

    def __init__(self, paths: Sequence[str], sizes: Sequence[Tuple[int, str]], defer_jpeg: bool = False):
        self.paths = list(paths)
        self.sizes = list(dict.fromkeys(sizes))
        self.defer_jpeg = defer_jpeg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> ImageItem:
        path = self.paths[row]
        try:
            st = os.stat(path)
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            return ImageItem(row, {}, "", "", -1, -1, f"{path}: cannot read image ({exc.strerror or exc})")
        digest = hashlib.sha256(data).hexdigest()
        try:
            if self.defer_jpeg and is_jpeg(data):
                check_header(data, path)
                return ImageItem(row, {}, digest, "", st.st_size, st.st_mtime_ns, "", data)
            pixels = decode_image(data, path)
            images = {(s, interp): resize(pixels, s, interp) for s, interp in self.sizes}
        except PipelineError as exc:
            return ImageItem(row, {}, digest, "", st.st_size, st.st_mtime_ns, str(exc))
        return ImageItem(row, images, digest, pixel_sha256(pixels), st.st_size, st.st_mtime_ns, "")


@dataclass
class ImageBatch:
    rows: np.ndarray
    sha256: np.ndarray
    pixels: np.ndarray  # S64: pixel_sha256 of each row ('' when unreadable)
    size_bytes: np.ndarray
    mtime_ns: np.ndarray
    errors: List[str]
    images: Dict[Tuple[int, str], torch.Tensor]  # key -> (n_good, 1, S, S) for the readable rows
    encoded: Dict[int, bytes] = field(default_factory=dict)  # position -> JPEG bytes not decoded yet

    @property
    def good(self) -> np.ndarray:
        return np.array([not e for e in self.errors], dtype=bool)


def collate(items: List[ImageItem]) -> ImageBatch:
    """One batch; `images` holds the decoded readable rows (all of them unless some are deferred JPEGs)."""
    good = [it for it in items if not it.error and it.encoded is None]
    keys = list(good[0].images) if good else []
    return ImageBatch(
        rows=np.array([it.row for it in items], dtype=np.int64),
        sha256=np.array([it.sha256 for it in items], dtype="S64"),
        pixels=np.array([it.pixels for it in items], dtype="S64"),
        size_bytes=np.array([it.size_bytes for it in items], dtype=np.int64),
        mtime_ns=np.array([it.mtime_ns for it in items], dtype=np.int64),
        errors=[it.error for it in items],
        images={k: torch.from_numpy(np.stack([it.images[k] for it in good]))[:, None] for k in keys},
        encoded={i: it.encoded for i, it in enumerate(items) if it.encoded is not None},
    )


def default_workers() -> int:
    """Decoding workers: one per core this process may use (its affinity and cgroup quota, not the machine's
    count) beside the main process, at least one, at most 16 (benchmarks/extract.py --decode sizes them)."""
    from pipeline.runtime import available_cores

    return max(1, min(16, available_cores() - 1))


def worker_init(worker_id: int) -> None:
    """A decoding worker must not keep the parent's cache lock alive after the parent dies."""
    from cache import close_inherited_locks

    close_inherited_locks()


def make_loader(paths: Sequence[str], batches: Sequence[Sequence[int]], sizes: Sequence[Tuple[int, str]],
                num_workers: Optional[int], pin_memory: bool = False, defer_jpeg: bool = False) -> DataLoader:
    workers = default_workers() if num_workers is None else num_workers
    return DataLoader(ImageFiles(paths, sizes, defer_jpeg), batch_sampler=[list(b) for b in batches],
                      num_workers=workers, worker_init_fn=worker_init, collate_fn=collate, pin_memory=pin_memory,
                      prefetch_factor=4 if workers > 0 else None)


POOLED, SPATIAL = "features", "spatial"


@dataclass
class LoadedBackbone:
    """A backbone ready to run: pooled vectors (group 'features') or one stage's maps (group 'spatial')."""

    module: nn.Module
    info: BackboneInfo
    pre: Preprocess
    provenance: str
    group: str = POOLED
    stage: Union[int, List[int], None] = None  # spatial: the stage, or the stages, of the maps

    @classmethod
    def of(cls, module: nn.Module, info: BackboneInfo, pre: Preprocess,
           stage: Union[int, List[int], None] = None) -> "LoadedBackbone":
        """The backbone's pooled entry, or (`stage`) the entry of that stage's maps (or those stages'), with its
        provenance: the one place an entry's provenance is computed, for stage one and for predict."""
        if stage is None:
            return cls(module, info, pre, provenance_sha256(info, pre))
        return cls(spatial_backbone(module, info.spec, stage), info, pre,
                   provenance_sha256(info, pre, {"stage": stage}), SPATIAL, stage)

    @property
    def key(self) -> EntryKey:
        """Where its output lives in the cache: features/<spec> or spatial/<spec>."""
        return EntryKey.of(self.group, self.info.spec)

    @property
    def name(self) -> str:
        """How summaries name it: the spec, or spatial:<spec>."""
        return self.info.spec if self.group == POOLED else f"spatial:{self.info.spec}"

    @property
    def size_key(self) -> Tuple[int, str]:
        return (self.pre.image_size, self.pre.interpolation)

    @property
    def dtype(self) -> str:
        return "f2" if self.group == SPATIAL else "f4"  # maps are large: half precision is plenty

    def attrs(self, precision: str) -> Dict[str, object]:
        extra = {"stage": self.stage} if self.stage is not None else {}
        return {**self.info.as_dict(), "preprocess": self.pre.as_dict(), "provenance_sha256": self.provenance,
                "precision": precision, **extra}


def load_backbones(names: Sequence[str], weights: Dict[str, str], image_size: int, interpolation: str,
                   normalize: str, seed: int, spatial: Optional[SpatialConfig] = None) -> Dict[str, LoadedBackbone]:
    """Create each named backbone (key -> LoadedBackbone); `weights` maps name -> imagenet | none | file.

    With `spatial` enabled, each backbone (or those `spatial.backbones` names) also yields a spatial entry:
    the maps of stage `spatial.stage` (or of the stages `spatial.stages`) at input size `spatial.image_size`,
    sharing the same weights.
    """
    check_offline_weights([name for name in names if weights[name] == "imagenet"])
    out: Dict[str, LoadedBackbone] = {}
    for name in names:
        module, info = create_backbone(name, weights=weights[name], seed=seed)
        pre = make_preprocess(info, image_size, interpolation, normalize)
        pooled = LoadedBackbone.of(module, info, pre)
        if pooled.key in out:
            raise ConfigError(f"backbone '{name}' is requested twice (as {info.spec})")
        out[pooled.key] = pooled
        if spatial is not None and spatial.enabled and (not spatial.backbones or name in spatial.backbones):
            spre = make_preprocess(info, spatial.image_size, interpolation, normalize)
            stage = list(spatial.stages) if len(spatial.stages) > 1 else (spatial.stages or [spatial.stage])[0]
            entry = LoadedBackbone.of(module, info, spre, stage)
            out[entry.key] = entry
    return out


class Extractor:
    """Runs loaded backbones on a device; CUDA gets autocast (bf16/fp16) and channels_last; `decode` 'gpu' decodes
    JPEG files with torchvision on the device (pipeline.features.jpeg; on a CPU device, on the CPU)."""

    def __init__(self, backbones: Dict[str, LoadedBackbone], device: torch.device, amp: str = "auto",
                 channels_last: bool = True, decode: str = "cpu"):
        self.backbones = backbones
        self.device = device
        self.cuda = device.type == "cuda"
        if decode not in ("cpu", "gpu"):
            raise ConfigError(f"extract.decode '{decode}' must be cpu (PIL in the loader's workers) or gpu "
                              "(torchvision's JPEG decoder on the device)")
        self.defer_jpeg = decode == "gpu"
        if self.defer_jpeg:
            check_decode_gpu([lb.pre.interpolation for lb in backbones.values()])
        if self.defer_jpeg and not self.cuda:
            logger.info("extract.decode gpu on %s: JPEG files are decoded by torchvision on the CPU", device)
        if amp not in ("auto", "bf16", "fp16", "off"):
            raise ConfigError(f"extract.amp '{amp}' must be auto, bf16, fp16 or off")
        if amp == "fp16" and not self.cuda:
            raise ConfigError("extract.amp fp16 needs a CUDA device; on a CPU use bf16 (CPU autocast) or off")
        # auto: bf16 autocast on CUDA, float32 on a CPU (bf16 there is opt-in: it is slow without bf16 units)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get("bf16" if amp == "auto" and self.cuda
                                                                             else amp)
        self.channels_last = channels_last and self.cuda
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        for lb in backbones.values():
            lb.module.to(device)
            if self.channels_last:
                lb.module.to(memory_format=torch.channels_last)

    def output_shape(self, key: str) -> Tuple[int, ...]:
        """Per-image output shape of an entry: (D,) for pooled features, (C, h, w) for maps."""
        if key not in self._shapes:
            lb = self.backbones[key]
            if lb.group == POOLED:
                return (lb.info.feature_dim,)
            probe = torch.zeros(1, 1, lb.pre.image_size, lb.pre.image_size)
            self._shapes[key] = tuple(self.run(key, probe).shape[1:])
        return self._shapes[key]

    def passes(self, paths: Sequence[str], batches: Sequence[Sequence[int]], num_workers: Optional[int],
               skip_bad: bool) -> Iterator[ImageBatch]:
        """The batches (indices into `paths`) decoded by loader workers at every size its backbones need, in
        order, for stage one and predict alike; an unreadable image stops with its one-line error unless
        `skip_bad` (then the batch says which images were bad)."""
        sizes = sorted({lb.size_key for lb in self.backbones.values()})
        for batch in make_loader(paths, batches, sizes, num_workers, pin_memory=self.cuda,
                                 defer_jpeg=self.defer_jpeg):
            if batch.encoded:
                decode_deferred(batch, paths, sizes, self.device)
            read_error(batch, skip_bad)
            yield batch

    @property
    def precision(self) -> str:
        """How the features were computed; batches of different precision are never mixed in one cache."""
        dtype = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        return f"{self.device.type}-{dtype}" + (f"-{DECODER_TAG}" if self.defer_jpeg else "")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @torch.inference_mode()
    def run(self, key: str, images: torch.Tensor) -> np.ndarray:
        """(B, 1, S, S) in [0, 1] -> (B, D) float32 features, or (B, C, h, w) float16 maps, of one entry."""
        lb = self.backbones[key]
        x = images.to(self.device, non_blocking=True)
        x = normalise(x, lb.pre)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            y = lb.module(x)
        return y.float().cpu().numpy().astype(lb.dtype, copy=False)

    def run_batched(self, key: str, images: np.ndarray, batch_size: int) -> np.ndarray:
        """(n, S, S) in [0, 1] -> (n, ...): run() on `batch_size` images at a time (a second look's crops)."""
        parts = [self.run(key, torch.from_numpy(images[s:s + batch_size])[:, None])
                 for s in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, *self.output_shape(key)), dtype=np.float32)


def read_error(batch: ImageBatch, skip_bad: bool) -> None:
    """Raise the first unreadable image of a batch unless --skip-bad records them."""
    if skip_bad:
        return
    for error in batch.errors:
        if error:
            raise DataError(f"{error}; or pass --skip-bad to record unreadable images and go on")
