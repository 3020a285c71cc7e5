"""Training-step time of the makemoe preset: moekit vs makeMoE's own code, interleaved.

Also the dense limit: the same model with each MoE layer replaced by one expert of hidden
width k*4d (the same active FLOPs per token, no routing), which bounds what any MoE dispatch
can reach on this machine.

Run: python benchmarks/lm_step.py [--rounds 7] [--steps 10]
Both models train on the same random batches (batch 16, block 32, V=65, AdamW lr 1e-3);
rounds alternate between them and the medians are compared (the machine is shared).
"""

import argparse
import statistics
import time

import torch
from makemoe_reference import MakeMoELanguageModel

from moekit import ExpertBank, MoE, SoftmaxRouter
from moekit.lm import SparseMoELanguageModel
from moekit.lm.config import TrainConfig
from moekit.lm.train import make_optimizer


def step_fn(model, optimizer, batches, with_aux):
    def run(i):
        x, y = batches[i % len(batches)]
        _, loss = model(x, y)
        if with_aux:
            loss = loss + model.aux_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def dense_limit_model() -> SparseMoELanguageModel:
    model = SparseMoELanguageModel()
    cfg = model.config
    for block in model.blocks:
        width = cfg.top_k * 4 * cfg.n_embed
        block.moe = MoE(
            cfg.n_embed,
            1,
            1,
            router=SoftmaxRouter(cfg.n_embed, 1, 1),
            experts=ExpertBank(1, cfg.n_embed, width, "relu", bias=True, dropout=cfg.dropout),
            load_balance_coef=0.0,
        )
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    batches = [(torch.randint(0, 65, (16, 32)), torch.randint(0, 65, (16, 32))) for _ in range(8)]
    ours = SparseMoELanguageModel()
    theirs = MakeMoELanguageModel()
    limit = dense_limit_model()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"parameters: moekit {sum(p.numel() for p in ours.parameters()):,}, "
        f"makeMoE {sum(p.numel() for p in theirs.parameters()):,}"
    )
    runs = {
        "moekit": step_fn(ours, make_optimizer(ours, TrainConfig()), batches, True),
        "makeMoE": step_fn(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-3), batches, False),
        "limit": step_fn(limit, make_optimizer(limit, TrainConfig()), batches, False),
    }
    times = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        for i in range(3):
            run(i)
    for _ in range(args.rounds):
        for name, run in runs.items():
            tic = time.perf_counter()
            for i in range(args.steps):
                run(i)
            times[name].append((time.perf_counter() - tic) / args.steps * 1e3)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f"{name:>8}: {t:7.1f} ms/step  ({16 * 32 / t * 1e3:,.0f} tokens/s)")
    print(f"speed-up moekit vs makeMoE: {med['makeMoE'] / med['moekit']:.2f}x")
    print(f"moekit / dense limit: {med['moekit'] / med['limit']:.2f}")


if __name__ == "__main__":
    main()
