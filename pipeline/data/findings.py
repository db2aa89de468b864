"""One vocabulary of findings across data sets (`data.harmonise: true`): every layout's finding columns renamed to
the reference names of configs/findings.yaml (torchxrayvision's 18 default pathologies), so that NIH's
`Effusion`, CheXpert's `Pleural Effusion` and VinDr's `Pleural effusion` are one column. A finding without a
counterpart keeps its name. This module owns the table; stage two and inspect-data call `harmonise_findings`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from pipeline.configio import config_dir, load_yaml
from pipeline.errors import ConfigError

logger = logging.getLogger(__name__)


def spelling_key(name: str) -> str:
    """What spellings are matched on: lower case, '_' and '/' as spaces, spaces collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"[_/]", " ", str(name))).strip().lower()


@dataclass(frozen=True)
class Vocabulary:
    """The reference names and every known spelling (spelling_key) -> its reference name."""

    source: str
    reference: Tuple[str, ...]
    spellings: Dict[str, str]

    def name_of(self, column: str) -> Optional[str]:
        """The reference name of a finding column, or None where it has no counterpart."""
        return self.spellings.get(spelling_key(column))


def load_vocabulary(path: Optional[str] = None) -> Vocabulary:
    """configs/findings.yaml (or `path`), checked: synonyms name reference findings, no spelling twice."""
    source = Path(path) if path else config_dir() / "findings.yaml"
    raw = load_yaml(source)
    reference = tuple(str(r) for r in (raw or {}).get("reference") or ())
    if not reference:
        raise ConfigError(f"{source}: 'reference' must list the harmonised finding names")
    spellings = {spelling_key(r): r for r in reference}
    for name, words in ((raw or {}).get("synonyms") or {}).items():
        if name not in reference:
            raise ConfigError(f"{source}: synonyms of '{name}', which is not a reference finding "
                              f"({', '.join(reference)})")
        for word in words or []:
            key = spelling_key(word)
            if spellings.get(key, name) != name:
                raise ConfigError(f"{source}: '{word}' is a spelling of both '{spellings[key]}' and '{name}'")
            spellings[key] = name
    return Vocabulary(str(source), reference, spellings)


def harmonise_findings(table: pd.DataFrame, groups: Dict[str, Sequence[str]],
                       vocabulary: Optional[Vocabulary] = None) -> Tuple[pd.DataFrame, Dict[str, List[str]], Dict]:
    """The table with every finding column of `groups` renamed to its reference name, the groups so renamed, and
    the mapping {column: reference name or None (kept)}. Two columns of one table with one reference name are
    an error naming both."""
    vocabulary = vocabulary or load_vocabulary()
    mapping: Dict[str, Optional[str]] = {}
    for members in groups.values():
        for column in members:
            mapping[column] = vocabulary.name_of(column)
    taken: Dict[str, str] = {}
    for column, name in mapping.items():
        target = name or column
        if target in taken and taken[target] != column:
            raise ConfigError(f"data.harmonise: the findings '{taken[target]}' and '{column}' are both "
                              f"'{target}' in {vocabulary.source}; keep one spelling per finding there")
        taken[target] = column
    renames = {c: n for c, n in mapping.items() if n and n != c}
    renamed = {group: [renames.get(c, c) for c in members] for group, members in groups.items()}
    if renames:
        logger.info("data.harmonise: %s", ", ".join(f"{c} -> {n}" for c, n in renames.items()))
    return table.rename(columns=renames), renamed, mapping


def describe_mapping(table: pd.DataFrame, mapping: Dict[str, Optional[str]]) -> List[str]:
    """inspect-data's lines for the harmonised vocabulary: each finding's name, what it was, its positives."""
    lines = ["  harmonised findings (data.harmonise: true; configs/findings.yaml):"]
    for column, name in mapping.items():
        values = pd.to_numeric(table[name or column], errors="coerce")
        counts = f"{int((values == 1).sum())} positive of {int(values.notna().sum())} labelled"
        was = f" <- {column}" if name and name != column else "" if name else " (no counterpart: kept)"
        lines.append(f"    {name or column}{was}: {counts}")
    return lines
