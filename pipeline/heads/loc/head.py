"""The trained localisation head as the artefact keeps it (its members' tensors, the maps' statistics, the re-scorer)
and as predict applies it to new maps."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from pipeline.heads.loc.settings import LocSettings
from pipeline.heads.loc.candidates import Rescorer, detect
from pipeline.heads.loc.net import LocNet, build_net, config_of, member_scores, split_statistics

#: Prefixes of the localisation head's tensors in the head artefact (pipeline.heads.artefact): its stacked members'
#: weights, and the second stage; `loc_mean` / `loc_std` hold the members' standardisation.
NET_PREFIX, RESCORE_PREFIX = "loc.", "loc_rescore."


@dataclass
class LocHead:
    """A trained localisation head as predict applies it: the stacked members, each member's standardisation,
    the second stage; written into and read from the head artefact by export_head / load_head alone."""

    cfg: LocSettings
    net: LocNet
    mean: torch.Tensor  # (M, C)
    std: torch.Tensor
    rescorer: Optional[Rescorer] = None

    @torch.no_grad()
    def detect(self, maps: np.ndarray) -> tuple:
        """Feature maps (n, C, H, W) -> the score maps (n, H, W; the members' mean) and their Detections."""
        self.net.eval()
        scores = member_scores(self.net, torch.from_numpy(maps), self.mean, self.std).numpy()
        return scores, detect(scores, self.cfg, maps, self.rescorer)


def export_head(states: Sequence[Dict[str, torch.Tensor]], train_rows: Sequence[np.ndarray], maps: np.ndarray,
                cfg: LocSettings, rescorer: Optional[Rescorer]) -> tuple:
    """(tensors, description) of a trained localisation head for the head artefact: the members' states (M = 1
    each) stacked as LocNet holds them, each member's standardisation from its training rows of `maps`."""
    tensors = {NET_PREFIX + name: torch.cat([st[name] for st in states]).contiguous().cpu() for name in states[0]}
    means, stds = zip(*(split_statistics(maps, rows) for rows in train_rows))
    tensors.update({"loc_mean": torch.stack(means).contiguous(), "loc_std": torch.stack(stds).contiguous()})
    if rescorer is not None:
        tensors.update({RESCORE_PREFIX + k: v for k, v in rescorer.tensors().items()})
    spec = {"channels": int(maps.shape[1]), "grid": list(maps.shape[2:]), "members": len(states),
            "hparams": asdict(cfg)}
    return tensors, spec


def load_head(spec: Dict[str, object], tensors: Dict[str, torch.Tensor]) -> LocHead:
    """The LocHead of an artefact's `localisation` description and tensors (export_head's)."""
    cfg = config_of(spec["hparams"])
    members = int(spec.get("members", 1))
    net = build_net(int(spec["channels"]), cfg, seeds=[0] * members)
    net.load_state_dict({k[len(NET_PREFIX):]: v for k, v in tensors.items() if k.startswith(NET_PREFIX)})
    second = {k[len(RESCORE_PREFIX):]: v for k, v in tensors.items() if k.startswith(RESCORE_PREFIX)}
    # (C,) in a head written before members were stacked
    return LocHead(cfg, net, tensors["loc_mean"].reshape(members, -1), tensors["loc_std"].reshape(members, -1),
                   Rescorer.from_tensors(second) if second else None)
