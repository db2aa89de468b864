"""Label maps: JSRT's free-text clinical fields (position, diagnosis, ...) to task classes."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from pipeline.configio import config_dir, load_yaml
from pipeline.errors import ConfigError, DataError

FIELDS = ("state", "lobe", "diagnosis", "sex")


def normalise_text(value: str) -> str:
    """Lower-case and collapse white space: the key every spelling is matched on."""
    return re.sub(r"\s+", " ", str(value).strip().lower())


@dataclass(frozen=True)
class LabelMaps:
    """Spelling -> class for each mapped field, with the class order of each."""

    source: str
    classes: Dict[str, Tuple[str, ...]]
    spellings: Dict[str, Dict[str, str]]

    def map(self, field: str, value: Optional[str], where: str) -> Optional[str]:
        """The class of `value`; None for an empty value; an unmapped value is a DataError."""
        if value is None or (isinstance(value, float) and value != value):
            return None
        key = normalise_text(value)
        if key in ("", "?", "nan", "none"):
            return None
        try:
            return self.spellings[field][key]
        except KeyError:
            raise DataError(
                f"{where}: {field} '{value}' is not mapped in {self.source}; add it under one of "
                f"{', '.join(self.classes[field])}") from None


def load_label_maps(path: Optional[str] = None) -> LabelMaps:
    """Read configs/labels.yaml (or `path`) and check that every spelling maps to exactly one class."""
    source = Path(path) if path else config_dir() / "labels.yaml"
    raw = load_yaml(source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with keys {', '.join(FIELDS)}")
    classes: Dict[str, Tuple[str, ...]] = {}
    spellings: Dict[str, Dict[str, str]] = {}
    for fld in FIELDS:
        groups = raw.get(fld)
        if not isinstance(groups, dict) or not groups:
            raise ConfigError(f"{source}: '{fld}' must map each class to a list of spellings")
        classes[fld] = tuple(str(c) for c in groups)
        table: Dict[str, str] = {}
        for cls, words in groups.items():
            for word in words or []:
                key = normalise_text(word)
                if key in table and table[key] != cls:
                    raise ConfigError(f"{source}: {fld} spelling '{word}' is listed under both "
                                      f"'{table[key]}' and '{cls}'")
                table[key] = str(cls)
        spellings[fld] = table
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; expected {', '.join(FIELDS)}")
    return LabelMaps(str(source), classes, spellings)
