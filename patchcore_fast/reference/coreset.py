"""The authors' greedy k-center loop (amazon-science/patchcore-inspection), step by step.

One framework call chain and one host synchronisation per selected point: this is
what users run today, and the oracle our kernels are checked against.
"""

from __future__ import annotations

import math

import torch


def pairwise_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L2 distances [len(a), len(b)] in the authors' expanded form, clamped at zero before the root."""
    a_sq = (a * a).sum(dim=1, keepdim=True)
    b_sq = (b * b).sum(dim=1).unsqueeze(0)
    return (a_sq - 2 * a @ b.T + b_sq).clamp_min(0).sqrt()


@torch.no_grad()
def greedy_coreset_reference(features: torch.Tensor, initial_distances: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of `n` greedy k-center picks, first pick = argmax of `initial_distances`.

    Each step picks the point farthest from the selection (first maximum on ties)
    and lowers every point's distance to its distance from the new pick. A picked
    point is pinned at -1 so that it is never picked twice, which only matters when
    every remaining point duplicates a picked one.
    """
    min_distance = initial_distances.reshape(-1, 1).clone()
    picks = []
    for _ in range(n):
        pick = int(torch.argmax(min_distance))
        picks.append(pick)
        to_pick = pairwise_l2(features, features[pick : pick + 1])
        min_distance = torch.min(torch.cat([min_distance, to_pick], dim=-1), dim=1).values.reshape(-1, 1)
        min_distance[pick] = -1
    return torch.tensor(picks, dtype=torch.long, device=features.device)


@torch.no_grad()
def reference_seeded_start(features: torch.Tensor, projection_dim: int | None = 128, num_starts: int = 10,
                           seed: int = 0):
    """The authors' setup, written out plainly: a bias-free nn.Linear's default weights (uniform in
    +-1/sqrt(D)) drawn from one CPU generator seeded with `seed`, then `num_starts` random rows;
    each row starts at its mean L2 distance to them. Returns (selection space, start distances)."""
    generator = torch.Generator().manual_seed(seed)
    space = features
    if projection_dim is not None and projection_dim != features.shape[1]:
        bound = 1.0 / math.sqrt(features.shape[1])
        weights = torch.empty(projection_dim, features.shape[1]).uniform_(-bound, bound, generator=generator)
        space = features @ weights.to(features.device).T
    starts = torch.randperm(len(space), generator=generator)[:num_starts].to(space.device)
    return space, pairwise_l2(space, space[starts]).mean(dim=1)
