"""Controls for expert reuse: what a method's gain over them says.

- :func:`random_pool`: a pool drawn at random instead of by similarity (does the ranking matter?).
- :func:`random_parameter_expert` / :func:`random_parameter_pool`: experts of the same kind, config, keys and shapes
  whose tensors are Gaussian noise rescaled to the originals' norms (does what the experts learned matter, or only
  that parameters of that size are added? After Liu, Raffel et al., 2026, arXiv 2602.12323).
- :func:`without`: the selected pool without the target's own expert (does the method only find the target?).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

from pituning.bank.records import Expert
from pituning.errors import ConfigError, ExpertError
from pituning.experts.lora import LoraConfig

__all__ = ["MATCHES", "random_parameter_expert", "random_parameter_pool", "random_pool", "without"]

MATCHES = ("norm", "delta")
"""What :func:`random_parameter_expert` matches: every tensor's norm, or (LoRA) each module's update's norm."""


def random_pool(candidates: Sequence[str], k: int, seed: int) -> list[str]:
    """``k`` names drawn from ``candidates`` without replacement, seeded (the random-pool control).

    The candidates are sorted first, so the draw depends on the set of names and the seed, not on their order.

    Raises:
        ConfigError: duplicate candidates, or ``k`` negative or larger than the number of candidates.

    Example:
        >>> random_pool(["c", "a", "b"], 2, seed=0) == random_pool(["a", "b", "c"], 2, seed=0)
        True
    """
    names = sorted(candidates)
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"random_pool candidates must be distinct; {duplicates} appear more than once.")
    if not 0 <= k <= len(names):
        raise ConfigError(
            f"random_pool cannot draw k={k} experts from {len(names)} candidates: choose 0 <= k <= {len(names)} "
            "or add candidates."
        )
    return random.Random(seed).sample(names, k)


def random_parameter_expert(expert: Expert, *, seed: int, name: str, match: str = "norm") -> Expert:
    """An expert like ``expert`` (same kind, config, keys and shapes) whose tensors are random (the random-parameter
    control).

    Every tensor is drawn from a standard Gaussian (a generator seeded with ``seed``, keys in sorted order) and
    rescaled to the Frobenius norm of the original tensor (a zero tensor stays zero). With ``match="delta"`` (LoRA
    only) ``A`` is matched as above and each module's ``B`` is then rescaled so that the random update
    ``scaling * B A`` has the Frobenius norm of the original update. The head is kept as is (the control changes the
    expert, not the classifier); the task embedding is dropped (it described the original weights).

    Args:
        expert: the original expert.
        seed: seed of the noise.
        name: the new expert's name.
        match: ``norm`` (each tensor's norm) or ``delta`` (LoRA: each module's update's norm).

    Returns:
        The control expert; provenance ``{"control": "random_parameters", "of", "seed", "match"}``.

    Raises:
        ConfigError: an unknown ``match``, or ``delta`` for an expert that is not LoRA.
    """
    if match not in MATCHES:
        raise ConfigError(f"match must be one of {list(MATCHES)}, got {match!r}.")
    if match == "delta" and not isinstance(expert.config, LoraConfig):
        raise ConfigError(
            f"match='delta' matches LoRA updates, but {expert.name!r} is a {expert.config.kind} expert; use "
            "match='norm'."
        )
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for key in sorted(expert.state):
        original = expert.state[key]
        noise = torch.randn(original.shape, generator=gen, dtype=torch.float64)
        state[key] = _rescaled(noise, float(original.double().norm())).to(original.dtype)
    if match == "delta":
        assert isinstance(expert.config, LoraConfig)
        scaling = expert.config.scaling
        for key in sorted(k for k in state if k.endswith("lora_A")):
            b_key = key[: -len("lora_A")] + "lora_B"
            if b_key not in state:
                raise ExpertError(f"Expert {expert.name!r} has {key!r} but no {b_key!r}; its weights are incomplete.")
            target = float((scaling * expert.state[b_key].double() @ expert.state[key].double()).norm())
            current = float((scaling * state[b_key].double() @ state[key].double()).norm())
            factor = target / current if current > 0 else 0.0
            state[b_key] = (state[b_key].double() * factor).to(expert.state[b_key].dtype)
    return Expert(
        name=name,
        config=expert.config,
        state=state,
        task=expert.task,
        backbone=expert.backbone,
        head={k: v.clone() for k, v in expert.head.items()} if expert.head is not None else None,
        provenance={"control": "random_parameters", "of": expert.name, "seed": seed, "match": match},
        modules=dict(expert.modules),
    )


def _rescaled(noise: Tensor, norm: float) -> Tensor:
    current = float(noise.norm())
    return noise * (norm / current) if current > 0 else torch.zeros_like(noise)


def random_parameter_pool(
    experts: Sequence[Expert], *, seed: int, match: str = "norm", suffix: str = "_random"
) -> list[Expert]:
    """:func:`random_parameter_expert` of each expert, named ``<name><suffix>``; expert ``i`` gets seed ``seed + i``
    (so no two share their noise).

    Raises:
        ConfigError: an empty pool, or as :func:`random_parameter_expert`.
    """
    if not experts:
        raise ConfigError("random_parameter_pool needs at least one expert.")
    return [
        random_parameter_expert(e, seed=seed + i, name=f"{e.name}{suffix}", match=match) for i, e in enumerate(experts)
    ]


def without(pool: Sequence[str], names: str | Sequence[str]) -> list[str]:
    """``pool`` without ``names`` (the pool-without-the-target control), in the pool's order.

    Names not in the pool are ignored (the target expert may not have been selected).

    Raises:
        ConfigError: nothing is left.

    Example:
        >>> without(["target", "a", "b"], "target")
        ['a', 'b']
    """
    drop = {names} if isinstance(names, str) else set(names)
    kept = [p for p in pool if p not in drop]
    if not kept:
        raise ConfigError(
            f"Removing {sorted(drop)} from the pool {list(pool)} leaves no expert; select a larger pool (k) first."
        )
    return kept
