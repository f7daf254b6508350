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
from engine.stops import ignore_stop_signals


def knn_votes(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int,
              temperature: float, num_classes: int, chunk: int = 1024, block: int = 65536) -> torch.Tensor:
    """Class votes [N_test, num_classes] of the weighted kNN rule (features need not be normalised;
    bank rows labelled -1 are padding and never vote). Similarities are float32, computed for
    ``chunk`` queries against ``block`` bank rows at a time (the top k of each block, then of
    their union), so the memory is bounded whatever the bank's size."""
    n_bank = int((train_labels >= 0).sum())
    if not 1 <= k <= n_bank:
        raise ValueError(f"k must be between 1 and the number of training samples ({n_bank}), got {k}")
    train = train_feats if train_feats.dtype == torch.bfloat16 else F.normalize(train_feats.float(), dim=1)
    out = []
    for i in range(0, test_feats.shape[0], chunk):
        test = F.normalize(test_feats[i:i + chunk].float(), dim=1)
        best_sim = torch.empty(test.shape[0], 0, device=test.device)
        best_idx = torch.empty(test.shape[0], 0, dtype=torch.int64, device=test.device)
        for j in range(0, train.shape[0], block):
            sim = test @ train[j:j + block].float().T                   # [B, block]
            sim.masked_fill_(train_labels[j:j + block][None] < 0, float("-inf"))
            s, idx = sim.topk(min(k, sim.shape[1]), dim=1)
            best_sim, pick = torch.cat([best_sim, s], 1).topk(min(k, best_sim.shape[1] + s.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, idx + j], 1).gather(1, pick)
        weights = (best_sim / temperature).exp()
        votes = torch.zeros(test.shape[0], num_classes, device=test.device)
        votes.scatter_add_(1, train_labels[best_idx], weights)
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=test_feats.device)


def knn_counts(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
               test_labels: torch.Tensor, k: int, temperature: float, num_classes: int) -> torch.Tensor:
    """float64 [top-1 hits, top-5 hits, queries] (top-5 is top-C for fewer classes): a sum over
    query shards, so ranks that score their own queries add theirs up."""
    votes = knn_votes(train_feats, train_labels, test_feats, k, temperature, num_classes)
    top = votes.topk(min(5, num_classes), dim=1).indices
    return torch.stack([(top[:, 0] == test_labels).sum(), (top == test_labels[:, None]).any(dim=1).sum(),
                        torch.tensor(len(test_labels), device=top.device)]).double()


def accuracy_of(counts: torch.Tensor) -> Dict[str, float]:
    hits1, hits5, n = counts.tolist()
    return {"top1": 100.0 * hits1 / max(n, 1), "top5": 100.0 * hits5 / max(n, 1)}


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 num_classes: Optional[int] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) of the weighted kNN rule (top-5 is top-C for fewer classes)."""
    c = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    return accuracy_of(knn_counts(train_feats, train_labels, test_feats, test_labels, k, temperature, c))


@torch.no_grad()
def _extract_share(features: Callable[[torch.Tensor], torch.Tensor], dataset: torch.utils.data.Dataset,
                   device: torch.device, world: int, rank: int, batch_size: int, num_workers: int,
                   amp_dtype: Optional[torch.dtype], dtype: torch.dtype, normalize: bool
                   ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """This rank's samples (every ``world``-th from ``rank``) written batch by batch into one
    buffer of ``ceil(len / world)`` rows (the same on every rank; padding rows: zeros, label -1):
    (features [rows, D] in ``dtype``, L2-normalised when ``normalize``; labels; samples held)."""
    mine = list(range(rank, len(dataset), world))
    rows = (len(dataset) + world - 1) // world
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         num_workers=num_workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0), worker_init_fn=ignore_stop_signals)
    f: Optional[torch.Tensor] = None
    y = torch.full((rows,), -1, dtype=torch.int64, device=device)
    pos = 0
    for x, lab in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = features(x.to(device, non_blocking=True)).float()
        if normalize:
            out = F.normalize(out, dim=1)
        if f is None:
            f = torch.zeros(rows, out.shape[1], dtype=dtype, device=device)
        f[pos:pos + len(out)], y[pos:pos + len(out)] = out, lab.to(device)
        pos += len(out)
    if world > 1:                     # a rank can hold no sample when the set is tiny: take the others' width
        dim = torch.tensor([0 if f is None else f.shape[1]], device=device)
        tdist.all_reduce(dim, op=tdist.ReduceOp.MAX)
        if f is None:
            f = torch.zeros(rows, int(dim.item()), dtype=dtype, device=device)
    return (f if f is not None else torch.zeros(rows, 0, dtype=dtype, device=device)), y, len(mine)


def extract_features(features: Callable[[torch.Tensor], torch.Tensor], dataset: torch.utils.data.Dataset,
                     device: torch.device, dist: Optional[DistInfo] = None, batch_size: int = 256,
                     num_workers: int = 0, amp_dtype: Optional[torch.dtype] = None,
                     gather: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 features and labels of every sample of ``dataset`` (in dataset order), each rank
    extracting every ``world_size``-th sample and all ranks receiving the gathered result
    (``gather=False``: this rank's share only)."""
    world, rank = (dist.world_size, dist.rank) if dist is not None and dist.enabled else (1, 0)
    f, y, n = _extract_share(features, dataset, device, world, rank, batch_size, num_workers, amp_dtype,
                             torch.float32, normalize=False)
    if world == 1 or not gather:
        return f[:n], y[:n]
    f_all, y_all = _all_gather(f, y, world)
    # rank r's row j is sample r + j * world: interleave back into dataset order
    f_all = f_all.view(world, -1, f.shape[1]).transpose(0, 1).reshape(-1, f.shape[1])[:len(dataset)]
    return f_all, y_all.view(world, -1).T.reshape(-1)[:len(dataset)]


def _all_gather(f: torch.Tensor, y: torch.Tensor, world: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every rank's equally long share, rank after rank, in one buffer each (no per-rank list)."""
    f_all = torch.empty(world * f.shape[0], f.shape[1], dtype=f.dtype, device=f.device)
    y_all = torch.empty(world * y.shape[0], dtype=y.dtype, device=y.device)
    tdist.all_gather_into_tensor(f_all, f.contiguous())
    tdist.all_gather_into_tensor(y_all, y)
    return f_all, y_all


def extract_bank(features: Callable[[torch.Tensor], torch.Tensor], dataset: torch.utils.data.Dataset,
                 device: torch.device, dist: Optional[DistInfo] = None, batch_size: int = 256,
                 num_workers: int = 0, amp_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kNN bank of ``dataset`` on every rank: L2-normalised bf16 features written by each rank
    into its padded share and gathered once into one buffer, with labels (-1 on padding rows, which
    never vote). Memory per rank: the bank in bf16 plus one share (docs/knn_memory.md)."""
    world, rank = (dist.world_size, dist.rank) if dist is not None and dist.enabled else (1, 0)
    f, y, n = _extract_share(features, dataset, device, world, rank, batch_size, num_workers, amp_dtype,
                             torch.bfloat16, normalize=True)
    return (f[:n], y[:n]) if world == 1 else _all_gather(f, y, world)


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
        bank, bank_y = extract_bank(features, self.train_set, dev, **kw)
        query, query_y = extract_features(features, self.val_set, dev, **kw, gather=False)   # this rank's queries
        counts = knn_counts(bank, bank_y, query, query_y, self.cfg.k, self.cfg.temperature, self.num_classes)
        if self.dist.enabled:
            tdist.all_reduce(counts)
        return accuracy_of(counts)

