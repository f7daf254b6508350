"""Weighted k-nearest-neighbour classification of frozen features, and the monitor that runs it
during pretraining.

The rule is the one of InstDisc (Wu et al., 2018) as DINO's ``eval_knn.py`` uses it: features are
L2-normalised, each test sample takes the ``k`` training samples of highest cosine similarity
``s``, every neighbour votes for its class with weight ``exp(s / T)``, and the classes are ranked
by their summed votes (top-1 / top-5 accuracy in percent).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from engine.config import ConfigError
from engine.data import EvalDataset, check_same_classes, eval_transform, image_folder
from engine.distributed import DistInfo


def knn_votes(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int,
              temperature: float, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """Class votes [N_test, num_classes] of the weighted kNN rule (features need not be normalised)."""
    if not 1 <= k <= train_feats.shape[0]:
        raise ValueError(f"k must be between 1 and the number of training samples ({train_feats.shape[0]}), got {k}")
    train = F.normalize(train_feats.float(), dim=1)
    out = []
    for i in range(0, test_feats.shape[0], chunk):
        test = F.normalize(test_feats[i:i + chunk].float(), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)                       # [B, k]
        weights = (sim / temperature).exp()
        votes = torch.zeros(test.shape[0], num_classes, device=test.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 num_classes: Optional[int] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) of the weighted kNN rule (top-5 is top-C for fewer classes)."""
    c = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    votes = knn_votes(train_feats, train_labels, test_feats, k, temperature, c)
    top = votes.topk(min(5, c), dim=1).indices
    return {"top1": 100.0 * (top[:, 0] == test_labels).float().mean().item(),
            "top5": 100.0 * (top == test_labels[:, None]).any(dim=1).float().mean().item()}


@torch.no_grad()
def extract_features(features: Callable[[torch.Tensor], torch.Tensor], dataset: torch.utils.data.Dataset,
                     device: torch.device, dist: Optional[DistInfo] = None, batch_size: int = 256,
                     num_workers: int = 0, amp_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of ``dataset`` (in dataset order), each rank extracting
    every ``world_size``-th sample and all ranks receiving the gathered result."""
    world, rank = (dist.world_size, dist.rank) if dist is not None and dist.enabled else (1, 0)
    mine = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         num_workers=num_workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))
    feats, labels = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            f = features(x.to(device, non_blocking=True))
        feats.append(f.float())
        labels.append(y.to(device))
    f = torch.cat(feats) if feats else torch.zeros(0, 0, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device)
    if world == 1:
        return f, y
    # gather: pad every shard to the longest, then interleave back into dataset order
    n_max = (len(dataset) + world - 1) // world
    dim = torch.tensor([f.shape[1] if len(mine) else 0], device=device)
    tdist.all_reduce(dim, op=tdist.ReduceOp.MAX)
    fp = torch.zeros(n_max, int(dim.item()), device=device)
    yp = torch.full((n_max,), -1, dtype=torch.int64, device=device)
    if len(mine):                                  # a rank can hold no sample when the set is tiny
        fp[:len(mine)], yp[:len(mine)] = f, y
    fs, ys = [torch.empty_like(fp) for _ in range(world)], [torch.empty_like(yp) for _ in range(world)]
    tdist.all_gather(fs, fp)
    tdist.all_gather(ys, yp)
    f_all = torch.stack(fs, 1).reshape(world * n_max, -1)[:len(dataset)]   # sample i is row i
    y_all = torch.stack(ys, 1).reshape(-1)[:len(dataset)]
    return f_all, y_all


@dataclass
class KNNConfig:
    """``eval.knn`` of a pretraining config: a labelled bank (train) and query set (val), both
    ImageFolder trees; empty ``train`` turns the monitor off."""

    train: str = ""                 # ImageFolder with the kNN bank (e.g. /data/imagenet/train; "{data.path}/train");
                                    # empty: the monitor is off
    val: str = ""                   # ImageFolder with the queries (same class folders)
    k: int = 20                     # neighbours that vote
    temperature: float = 0.07       # vote weight: exp(cosine similarity / temperature)
    feature: str = "cls"            # cls (normed cls token) | avgpool (mean of normed patch tokens)
    img_size: Optional[int] = None  # default: the model's final size
    crop_pct: float = 0.875         # evaluation transform: resize to img_size / crop_pct, centre crop
    batch_size: int = 256           # images per feature-extraction batch (per process)
    max_train: int = 0              # > 0: a fixed seeded subset of the bank (cheaper evaluations)
    max_val: int = 0                # > 0: a fixed seeded subset of the queries

    @property
    def enabled(self) -> bool:
        return bool(self.train)

    def validate(self, where: str) -> None:
        if bool(self.train) != bool(self.val):
            raise ConfigError(f"{where}: set both train and val (ImageFolder trees) to run the kNN monitor, "
                              f"or neither; got train={self.train!r}, val={self.val!r}")
        if self.k < 1:
            raise ConfigError(f"{where}.k must be >= 1, got {self.k}")
        if not self.temperature > 0:
            raise ConfigError(f"{where}.temperature must be > 0, got {self.temperature}")
        if self.feature not in ("cls", "avgpool"):
            raise ConfigError(f"{where}.feature: {self.feature!r} is not allowed; allowed: cls, avgpool")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"{where}.crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.max_train < 0 or self.max_val < 0 or self.batch_size < 1:
            raise ConfigError(f"{where}: max_train / max_val must be >= 0 (0 = all) and batch_size >= 1")


def _subset(files: List[str], labels: List[int], n: int) -> Tuple[List[str], List[int]]:
    """A fixed seeded subset of ``n`` samples (all when ``n`` is 0 or not smaller), in file order."""
    if n <= 0 or n >= len(files):
        return files, labels
    keep = sorted(torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:n].tolist())
    return [files[i] for i in keep], [labels[i] for i in keep]


class KNNMonitor:
    """kNN top-1 / top-5 of a model's features on a labelled bank and query set (both extracted
    anew at every call: the encoder changes between calls)."""

    def __init__(self, cfg: KNNConfig, img_size: int, dist: DistInfo, num_workers: int = 0) -> None:
        self.cfg, self.dist, self.num_workers = cfg, dist, num_workers
        self.img_size = cfg.img_size or img_size
        train_files, train_labels, classes = image_folder(cfg.train)
        val_files, val_labels, val_classes = image_folder(cfg.val)
        check_same_classes(classes, val_classes, cfg.train, cfg.val)
        train_files, train_labels = _subset(train_files, train_labels, cfg.max_train)
        val_files, val_labels = _subset(val_files, val_labels, cfg.max_val)
        if cfg.k > len(train_files):
            raise ConfigError(f"eval.knn.k={cfg.k} but the bank ({cfg.train}) has only {len(train_files)} images")
        tf = eval_transform(self.img_size, cfg.crop_pct)
        self.train_set, self.val_set = EvalDataset(train_files, train_labels, tf), EvalDataset(val_files, val_labels, tf)
        self.num_classes = len(classes)

    def __call__(self, features: Callable[[torch.Tensor], torch.Tensor], amp_dtype: Optional[torch.dtype] = None
                 ) -> Dict[str, float]:
        dev = self.dist.device
        kw = dict(dist=self.dist, batch_size=self.cfg.batch_size, num_workers=self.num_workers, amp_dtype=amp_dtype)
        bank, bank_y = extract_features(features, self.train_set, dev, **kw)
        query, query_y = extract_features(features, self.val_set, dev, **kw)
        return knn_accuracy(bank, bank_y, query, query_y, self.cfg.k, self.cfg.temperature, self.num_classes)
