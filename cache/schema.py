"""The feature cache's HDF5 schema (version 1): names, attributes, and how tables are stored.

    /                        attrs: format, schema_version, complete, created_utc, tool_version, packages,
                                    data_root, data_layout, n_images, ids_sha256, image_set_sha256,
                                    labels_sha256, config (resolved YAML); shard files add shard_index,
                                    num_shards, dataset_labels_sha256 (the whole data set's labels)
    /images/{id,relpath}     (N,) utf-8 strings
    /images/sha256           (N,) 64-byte ASCII: content hash of each image file
    /images/{size_bytes,mtime_ns}  (N,) int64: the file's stat when it was read (fast staleness check)
    /images/{width,height}   (N,) float64: stored image size
    /images/{bad,error}      (N,) bool / utf-8: images that could not be read (--skip-bad)
    /images/row              shard files only: each row's index in the full data set
    /images/pixels_sha256    (N,) 64-byte ASCII: hash of each decoded image (pixel_sha256; caches before it: none)
    /labels/<column>         (N,) float64 (NaN = missing) or utf-8 ('' = missing); attr kind
    /features/<spec>         (N, D) float32, chunked; attrs: backbone facts, preprocessing, provenance_sha256,
                             precision, complete
    /spatial/<spec>          (N, C, H, W) float16 feature maps (extract-features --spatial); attrs as above
    /fused/<name>            (N, sum D) float32 virtual dataset concatenating /features members; attr members
    /patches/<set>           a patch set (extract-features --patches): attrs source, points_sha256, crop, n_patches
    /patches/<set>/{image_row,x,y,size,score,rank}  (P,) per patch: the image's row, the point in the data's
                             coordinate grid, the crop's side in image pixels, the first stage's score and rank
                             (NaN / 0 for points without), rows grouped by image
    /patches/<set>/<spec>    (P, D) float32 embeddings of the patches; attrs as /features plus backbone_provenance

<spec> is the backbone's spec with '/' and '%' percent-encoded (entry_name: a Hugging Face id holds '/'); every
other spec is its own name. Nothing is pickled: every attribute is a number, a string, or a JSON string.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence

import h5py
import numpy as np

FORMAT = "resmtnet-feature-cache"
SCHEMA_VERSION = 1
#: Rows per HDF5 chunk of a feature dataset are chosen so a chunk is about this many bytes.
CHUNK_BYTES = 1 << 20

STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class Groups:
    images: str = "images"
    labels: str = "labels"
    features: str = "features"
    spatial: str = "spatial"
    fused: str = "fused"
    patches: str = "patches"


GROUPS = Groups()


def ids_sha256(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def image_set_sha256(ids: Sequence[str], hashes: Sequence[str]) -> str:
    """Fingerprint of the image set: ids and content hashes, in row order."""
    return hashlib.sha256("\n".join(f"{i}:{h}" for i, h in zip(ids, hashes)).encode()).hexdigest()


def labels_sha256(columns: Dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(columns):
        values = columns[name]
        digest.update(name.encode())
        if values.dtype.kind == "f":
            digest.update(np.ascontiguousarray(values, dtype="<f8").tobytes())
        else:
            digest.update("\x1f".join(strings(values)).encode())
    return digest.hexdigest()


def chunk_rows(dim: int, itemsize: int = 4) -> int:
    return max(1, CHUNK_BYTES // max(1, dim * itemsize))


def write_attrs(obj: h5py.HLObject, attrs: Dict[str, object]) -> None:
    """Attributes as HDF5 scalars/strings; lists and dicts as JSON strings (never pickles)."""
    for key, value in attrs.items():
        if isinstance(value, (dict, list, tuple)):
            obj.attrs[key] = json.dumps(value)
        elif value is None:
            obj.attrs[key] = ""
        else:
            obj.attrs[key] = value


def read_attrs(obj: h5py.HLObject, json_keys: Iterable[str] = ()) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for key, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        if key in json_keys and isinstance(value, str) and value:
            value = json.loads(value)
        out[key] = value
    return out


#: The per-patch arrays of a patch set, beside its backbones' embeddings.
PATCH_POINTS = ("image_row", "x", "y", "size", "score", "rank")
FEATURE_JSON_KEYS = ("mean", "std", "preprocess", "members", "stage")
ROOT_JSON_KEYS = ("packages",)


def strings(values: Iterable[object]) -> List[str]:
    return ["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in values]


class EntryKey(str):
    """A cached entry's key, 'group/spec' (features/densenet161, spatial/lite0): built and split here alone. A str,
    so journals and logs hold it as text, as they always have."""

    __slots__ = ()

    @classmethod
    def of(cls, group: str, spec: str) -> "EntryKey":
        return cls(f"{group}/{spec}")

    @property
    def group(self) -> str:
        return self.split("/", 1)[0]

    @property
    def spec(self) -> str:
        return self.split("/", 1)[1]


def entry_name(spec: str) -> str:
    """The HDF5 name of a backbone's dataset: its spec, with '/' (which HDF5 reads as a group, and Hugging Face
    ids hold) and '%' percent-encoded; specs without them (every spec before schema 1's hf: family) are
    unchanged, so older caches keep their names."""
    return spec.replace("%", "%25").replace("/", "%2F")


def entry_spec(name: str) -> str:
    """The spec of an HDF5 dataset name (entry_name's inverse)."""
    return name.replace("%2F", "/").replace("%25", "%")
