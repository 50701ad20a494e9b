"""Meta-training tasks from unlabelled image-text pairs (GRAM's cross-modal hierarchical clustering,
as vlprompt reads it) and the N-way K-shot episodes drawn from them.

**Clustering.** Each pair is represented by its frozen image and caption features, each L2-normalised,
concatenated (so both modalities weigh the same). k-means (scikit-learn) splits the pairs into
``n_domains`` coarse clusters, the *domains*; k-means again splits each domain into
``classes_per_domain`` fine clusters, the *pseudo-classes*. A pseudo-class is named by the caption
whose feature lies closest to the mean caption feature of its members (names are kept distinct).
Pseudo-classes with fewer than ``min_class_size`` pairs are dropped.

**Episodes.** An episode draws a support domain and a different query domain; N pseudo-classes of
each; K support pairs per support class and Q query pairs per query class. Support and query
therefore never share an image, nor a class: the inner loop adapts to one domain's task, the outer
loss asks whether that adaptation still serves another domain's (cross-domain generalisation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Episode", "EpisodeSampler", "PairHierarchy", "cluster_pairs"]

log = logging.getLogger(__name__)


@dataclass
class PairHierarchy:
    """Domains and pseudo-classes of a pair collection: ``domain[i]`` and ``label[i]`` of pair ``i``
    (``label`` -1 for pairs of dropped classes), ``classnames[c]`` and ``class_domain[c]``."""

    domain: np.ndarray
    label: np.ndarray
    classnames: list[str]
    class_domain: np.ndarray

    def members(self, c: int) -> np.ndarray:
        return np.flatnonzero(self.label == c)


def cluster_pairs(image_features: torch.Tensor, text_features: torch.Tensor, captions: list[str], *,
                  n_domains: int, classes_per_domain: int, min_class_size: int = 2, seed: int = 0) -> PairHierarchy:
    """Cross-modal hierarchical clustering (see the module docstring)."""
    from sklearn.cluster import KMeans

    n = len(captions)
    if not (len(image_features) == len(text_features) == n):
        raise ValueError(f"{len(image_features)} image features, {len(text_features)} text features, {n} captions")
    if n and not any(c.strip() for c in captions):  # else every pseudo-class is named "" and all but one dropped
        raise ValueError(f"no pair has a caption: all {n} captions are empty")
    if n_domains < 2:
        raise ValueError(f"n_domains must be at least 2 (support and query come from different domains), got {n_domains}")
    if n < n_domains * classes_per_domain:
        raise ValueError(f"{n} pairs cannot form {n_domains} domains x {classes_per_domain} classes; use fewer clusters "
                         "or more pairs")
    text = F.normalize(text_features.float(), dim=-1)
    joint = torch.cat([F.normalize(image_features.float(), dim=-1), text], dim=1).numpy() / np.sqrt(2.0)
    domain = KMeans(n_domains, n_init=4, random_state=seed).fit_predict(joint)
    label = np.full(n, -1, dtype=np.int64)
    classnames: list[str] = []
    class_domain: list[int] = []
    used: set[str] = set()
    for d in range(n_domains):
        idx = np.flatnonzero(domain == d)
        k = min(classes_per_domain, len(idx))
        fine = KMeans(k, n_init=4, random_state=seed).fit_predict(joint[idx]) if k > 1 else np.zeros(len(idx), int)
        for c in range(k):
            members = idx[fine == c]
            if len(members) < min_class_size:
                continue
            centre = F.normalize(text[members].mean(0), dim=0)
            order = members[torch.argsort(text[members] @ centre, descending=True).numpy()]
            name = next((captions[i] for i in order if captions[i] not in used), None)
            if name is None:  # every caption of the cluster names another class already
                continue
            used.add(name)
            label[members] = len(classnames)
            classnames.append(name)
            class_domain.append(d)
    log.info("clustered %d pairs into %d domains and %d pseudo-classes (%d pairs in dropped classes)", n, n_domains,
             len(classnames), int((label < 0).sum()))
    return PairHierarchy(domain, label, classnames, np.asarray(class_domain, dtype=np.int64))


@dataclass
class Episode:
    """Pair indices and episode labels (0..N-1) of the support and query sets, and the class names
    of each (``support_names[label]``)."""

    support: np.ndarray
    support_labels: np.ndarray
    support_names: list[str]
    query: np.ndarray
    query_labels: np.ndarray
    query_names: list[str]


class EpisodeSampler:
    """N-way K-shot episodes with support and query from different domains; episode ``i`` is the same
    whatever the order it is drawn in (seeded by ``(seed, i)``)."""

    def __init__(self, hierarchy: PairHierarchy, n_way: int, k_shot: int, q_query: int, seed: int = 0) -> None:
        if min(n_way, k_shot, q_query) < 1 or n_way < 2:
            raise ValueError(f"need n_way >= 2, k_shot >= 1, q_query >= 1; got {n_way}, {k_shot}, {q_query}")
        self.hierarchy, self.n_way, self.k_shot, self.q_query, self.seed = hierarchy, n_way, k_shot, q_query, seed
        sizes = np.bincount(hierarchy.label[hierarchy.label >= 0], minlength=len(hierarchy.classnames))
        self.support_classes = self._by_domain(sizes >= k_shot)
        self.query_classes = self._by_domain(sizes >= q_query)
        pairs = [(s, q) for s in self.support_classes for q in self.query_classes if s != q]
        if not pairs:
            most = max((len(v) for v in self.support_classes.values()), default=0)
            raise ValueError(
                f"fewer clusters than ways: a {n_way}-way episode needs two domains with at least {n_way} pseudo-classes "
                f"of >= {max(k_shot, q_query)} pairs, but the largest domain has {most} such classes "
                f"({len(hierarchy.classnames)} classes in {len(set(hierarchy.class_domain.tolist()))} domains). "
                "Use fewer ways, more classes per domain, or more pairs.")
        self.domain_pairs = pairs

    def _by_domain(self, usable: np.ndarray) -> dict[int, np.ndarray]:
        out = {}
        for d in np.unique(self.hierarchy.class_domain):
            classes = np.flatnonzero(usable & (self.hierarchy.class_domain == d))
            if len(classes) >= self.n_way:
                out[int(d)] = classes
        return out

    def __getitem__(self, i: int) -> Episode:
        rng = np.random.default_rng([self.seed, i])
        s_dom, q_dom = self.domain_pairs[int(rng.integers(len(self.domain_pairs)))]
        support, s_labels, s_names = self._draw(rng, self.support_classes[s_dom], self.k_shot)
        query, q_labels, q_names = self._draw(rng, self.query_classes[q_dom], self.q_query)
        return Episode(support, s_labels, s_names, query, q_labels, q_names)

    def _draw(self, rng: np.random.Generator, classes: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        chosen = rng.choice(classes, size=self.n_way, replace=False)
        index = np.concatenate([rng.choice(self.hierarchy.members(c), size=per_class, replace=False) for c in chosen])
        labels = np.repeat(np.arange(self.n_way), per_class)
        return index, labels, [self.hierarchy.classnames[c] for c in chosen]
