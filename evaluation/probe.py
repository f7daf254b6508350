"""Linear probing on cached frozen features: the fast variant for small sets.

MAE's protocol trains a linear head behind a BatchNorm without affine parameters on the frozen
encoder (LARS, 90 epochs, large batches, `python -m finetune mode=linprobe`). With the features
extracted once, the same model is a linear classifier on standardised features: here it is
trained with AdamW and a cosine schedule on the cached tensors, which takes seconds for tens of
thousands of samples instead of an epoch of encoder passes per training epoch. The numbers are
comparable between arms of a study, not with published ImageNet probes.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int, epochs: int = 100, batch_size: int = 256,
                 lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                 on_epoch: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Top-1 / top-5 (%) of a linear classifier on standardised features (train statistics);
    ``on_epoch()`` is called after every epoch (progress)."""
    if train_feats.shape[0] != train_labels.shape[0] or val_feats.shape[0] != val_labels.shape[0]:
        raise ValueError("features and labels disagree on the number of samples")
    mean, std = train_feats.mean(0, keepdim=True), train_feats.std(0, keepdim=True) + 1e-6
    xt, xv = (train_feats - mean) / std, (val_feats - mean) / std
    g = torch.Generator(device="cpu").manual_seed(seed)
    head = nn.Linear(xt.shape[1], num_classes)          # initialised on the CPU: the generator is a CPU one
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    head = head.to(xt.device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(xt.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(xt.shape[0], generator=g).to(xt.device)
        for i in range(0, xt.shape[0], batch_size):
            idx = order[i:i + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(xt[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if on_epoch is not None:
            on_epoch()
    with torch.no_grad():
        top = head(xv).topk(min(5, num_classes), dim=1).indices
    return {"top1": 100.0 * (top[:, 0] == val_labels).float().mean().item(),
            "top5": 100.0 * (top == val_labels[:, None]).any(dim=1).float().mean().item()}
