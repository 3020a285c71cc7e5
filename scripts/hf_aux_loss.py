"""Is transformers' auxiliary loss right for each patched family? `python scripts/hf_aux_loss.py`.

transformers' `load_balancing_loss_func` recomputes the expert choice as the top-k of a softmax
over the router logits it collected, over all layers at once: E * sum_e f_e * P_e with f_e the
share of (token, slot) pairs choosing e and P_e the mean softmax probability. Here the same
formula is computed with the choices the routers actually made (the patched routers count
them). Where the two agree, the family's aux loss balances the experts it routes to; where they
differ, it balances a softmax top-k that is not its routing (a correction bias, sigmoid scores,
groups, statistics), and `moekit finetune --router-bias-update` or moekit's own loss is the
honest choice. Tiny random models, train mode, float32.
"""

from __future__ import annotations

import warnings

import torch

from moekit.hf import RULES
from moekit.hf.aux import aux_loss_agreement
from moekit.hf.catalog import TinyModelError, tiny_model


def main() -> None:
    print("| family | transformers aux | with the routers' own choices | agrees |")
    print("|---|---|---|---|")
    for family in sorted({rule.family for rule in RULES.values()}):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = tiny_model(family).train()
        except TinyModelError:
            continue
        result = aux_loss_agreement(model)
        if result is None:
            continue
        theirs, ours = result
        agrees = abs(theirs - ours) <= 1e-5 * max(1.0, abs(ours))
        print(f"| {family} | {theirs:.6f} | {ours:.6f} | {'✓' if agrees else '✗'} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
