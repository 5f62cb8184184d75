"""Synthetic attention profiles with planted poison and known answers, for tests and benchmarks.

The structures are the ones that broke the paper-style filter in the tiny worlds (see the method
notes): query templates of unequal frequency and a query-length effect that make many clean heads
multimodal; heads with a few random outliers; poison that moves the system share down in some deep
heads and up in others; a clean template that shares the poison's extreme in one poison head; and a
clean upload (rate 0). Nothing here is imported by the detector.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SyntheticProfile:
    """Same fields as ``tcapguard.profiling.Profile`` plus the planted truth (``poisoned``)."""

    ids: list[str]
    shares: np.ndarray  # float32 [N, L, H, 3]
    vision_entropy: np.ndarray  # float32 [N, L]
    meta: dict = field(default_factory=dict)
    poisoned: np.ndarray | None = None  # bool [N]
    poison_heads: list[tuple[int, int]] = field(default_factory=list)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def make_profile(
    n_samples: int = 2000,
    n_layers: int = 8,
    n_heads: int = 8,
    *,
    rate: float = 0.1,
    n_poison_heads: int = 5,
    poison_layers: int = 3,
    poison_shift: float = 4.0,
    n_templates: int = 8,
    template_strength: float = 1.0,
    n_outlier_heads: int = 6,
    confounded_head: bool = True,
    entropy_effect: str = "down",
    seed: int = 0,
) -> SyntheticProfile:
    """A profile of ``n_samples`` with ``rate`` poisoned; poison moves the system-share logit by
    ``poison_shift`` (sign drawn per head) in ``n_poison_heads`` heads of the last ``poison_layers``
    layers. Every head carries template and length structure; ``template_strength`` scales it (1.0
    gives clearly multimodal heads). ``entropy_effect`` ("down", "up", "none") is what the poison does
    to the vision-attention entropy (a patch trigger lowers it, a global trigger raises it).
    """
    rng = np.random.default_rng(seed)
    n, L, H = n_samples, n_layers, n_heads
    freq = rng.dirichlet(np.full(n_templates, 1.0))
    template = rng.choice(n_templates, size=n, p=freq)
    length = rng.normal(0, 1, n)
    poisoned = np.zeros(n, dtype=bool)
    poisoned[rng.choice(n, size=round(rate * n), replace=False)] = True

    bias = rng.normal(0, 1.0, (L, H))
    # Template structure: a template moves the attention of most heads the same way (loading x
    # offset, as in the real tiny worlds, where a template group separates in 20-40% of head-shares),
    # plus head-specific template effects.
    offsets = template_strength * rng.normal(0, 1, n_templates)
    loading = rng.normal(0, 1, (L, H))
    t_effect = loading[..., None] * offsets + 0.3 * template_strength * rng.normal(0, 1, (L, H, n_templates))
    l_effect = rng.normal(0, 0.4, (L, H))
    noise = rng.uniform(0.15, 0.5, (L, H))
    z = (
        bias[None]
        + t_effect[:, :, template].transpose(2, 0, 1)
        + l_effect[None] * length[:, None, None]
        + rng.normal(0, 1, (n, L, H)) * noise[None]
    )

    flat = rng.permutation(poison_layers * H)[:n_poison_heads]
    heads = [(L - poison_layers + int(i) // H, int(i) % H) for i in flat]
    for j, (layer, head) in enumerate(heads):
        sign = -1.0 if j % 2 == 0 else 1.0  # down in some heads, up in others
        z[poisoned, layer, head] += sign * poison_shift * rng.uniform(0.8, 1.2, poisoned.sum())
        if confounded_head and j == 0:
            # One poison head where a clean template sits at the poison's extreme too.
            z[template == np.argsort(freq)[-3], layer, head] += sign * poison_shift
    others = [(lay, h) for lay in range(L) for h in range(H) if (lay, h) not in heads]
    for k in rng.permutation(len(others))[:n_outlier_heads]:
        layer, head = others[k]
        out = rng.random(n) < rng.uniform(0.005, 0.02)
        z[out, layer, head] += rng.choice([-1, 1]) * rng.uniform(3, 6)

    system = _sigmoid(z)
    vis_frac = _sigmoid(rng.normal(0, 1, (L, H))[None] + rng.normal(0, 0.3, (n, L, H)))
    for layer, head in heads:  # in the poison heads the freed mass goes to the trigger's image tokens
        vis_frac[poisoned, layer, head] = np.maximum(vis_frac[poisoned, layer, head], 0.9)
    shares = np.stack([system, (1 - system) * vis_frac, (1 - system) * (1 - vis_frac)], axis=-1)

    ent = rng.normal(3.0, 0.15, (n, L)) + 0.1 * rng.normal(0, 1, n_templates)[template][:, None]
    shift = {"down": -1.5, "up": 1.0, "none": 0.0}[entropy_effect]
    ent[np.ix_(poisoned, np.arange(L - 2, L))] += shift
    meta = {"synthetic": True, "rate": rate, "seed": seed, "n_layers": L, "n_heads": H}
    ids = [f"s{i:06d}" for i in range(n)]
    return SyntheticProfile(ids, shares.astype(np.float32), ent.astype(np.float32), meta, poisoned, heads)
