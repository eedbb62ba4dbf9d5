"""Run under torchrun with 2 processes (gloo): ranks hold different experts; sync_ must give the average."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bank_helpers import tiny_expert
from families import FAMILIES
from pituning import ExpertModel, LoraConfig
from pituning.bank import ExpertBank


def rank_values(model: ExpertModel, rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return {n: torch.randn(p.shape, generator=gen) for n, p in sorted(model.expert_parameters("a").items())}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = ExpertModel(FAMILIES["bert"].build())
    model.add_expert("a", LoraConfig(r=2))
    bf16_name = next(iter(rank_values(model, 0)))
    with torch.no_grad():
        for name, value in rank_values(model, rank).items():
            model.get_parameter(name).copy_(value)
        param = model.get_parameter(bf16_name)
        param.data = param.data.to(torch.bfloat16)  # one bf16 tensor: reduced in fp32, written back in bf16
    ExpertBank.sync_(model, ["a"])
    model_err = 0.0
    for name in rank_values(model, 0):
        values = [rank_values(model, r)[name] for r in range(world)]
        if name == bf16_name:
            values = [v.to(torch.bfloat16).float() for v in values]
        want = (sum(values) / world).to(model.get_parameter(name).dtype)
        model_err = max(model_err, (model.get_parameter(name) - want).abs().max().item())
    experts = [tiny_expert("x", seed=rank), tiny_expert("y", seed=10 + rank)]
    ExpertBank.sync_(experts)
    want = {
        key: (tiny_expert("x", seed=0).state[key] + tiny_expert("x", seed=1).state[key]) / 2 for key in experts[0].state
    }
    expert_err = max((experts[0].state[k] - v).abs().max().item() for k, v in want.items())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"model_err": model_err, "expert_err": expert_err}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
