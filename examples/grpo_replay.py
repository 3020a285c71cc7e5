"""GRPO (TRL) on a tiny MoE with routing replay: the training forward routes each token by the
experts it was routed to when the rollout generated it (moekit.hf.replay).

Run: python examples/grpo_replay.py            (CPU, under a minute; no network)

A tiny Qwen3-MoE on moekit's engine learns a toy reward (vowels in its completion). GRPO with
two iterations a generation: the policy moves between the rollout and the later training
forwards over the same completions, and so do its routers. Each training forward records its
routing; the router mismatch is the fraction of (token, layer) pairs whose top-k sets differ
from the rollout's. With replay it is 0: the recorded ids are the replayed ones; without, it
is what the moved routers chose otherwise. The weights still come from the live router logits,
so the routers train either way.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import warnings

import torch

from moekit.hf import RolloutRoutes, patch_model, record_routing, replay_routing, router_mismatch


def make_trainer_class():
    from trl import GRPOTrainer

    class ReplayGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose forwards replay the rollout's routes (`replay=True`), and which
        measures the router mismatch of every training forward against them."""

        def __init__(self, *args, replay: bool = True, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.replay, self.rollouts, self.mismatch = replay, RolloutRoutes(), []

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            with record_routing(self.model) as rec:
                completion_ids, logprobs = super()._generate_single_turn(
                    prompt_ids, *args, **kwargs
                )
            for prompt, completion, routes in zip(
                prompt_ids, completion_ids, rec.generated(prompt_ids, completion_ids), strict=True
            ):
                self.rollouts.add([*prompt, *completion], routes)
            return completion_ids, logprobs

        def _get_per_token_logps_and_entropies(
            self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs
        ):
            routes = self.rollouts.batch(input_ids, attention_mask)  # [B, T, L, k]
            replay = replay_routing(model, routes) if self.replay else contextlib.nullcontext()
            with replay, record_routing(model) as rec:
                # one chunk: the routes are the whole batch's
                out = super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, input_ids.size(0), **kwargs
                )
            known = (routes >= 0).all(-1).all(-1) & attention_mask.bool().cpu()  # [B, T]
            self.mismatch.append(router_mismatch(rec.routes, routes, known))
            return out

    return ReplayGRPOTrainer


def vowels(completions, **kwargs) -> list[float]:
    return [float(sum(ch in "aeiou" for ch in text)) for text in completions]


def run(replay: bool, steps: int = 3, seed: int = 0) -> float:
    """A short GRPO run; the mean router mismatch of its training forwards."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig

    from moekit.bench.sft import chat_tokenizer

    torch.manual_seed(seed)
    tok = chat_tokenizer()
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = transformers.Qwen3MoeForCausalLM(config)
    patch_model(model)
    prompts = ["The king", "My lord", "Good morrow", "O Romeo", "Now is", "To be"] * 4
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            max_steps=steps,
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=8,
            num_iterations=2,  # two updates a generation: the routers move in between
            learning_rate=5e-2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=seed,
            temperature=1.0,
        )
        trainer = make_trainer_class()(
            model=model,
            reward_funcs=vowels,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tok,
            replay=replay,
        )
        trainer.train()
    return statistics.fmean(trainer.mismatch)


def main() -> int:
    warnings.filterwarnings("ignore")
    with_replay, without = run(replay=True), run(replay=False)
    print(
        f"router mismatch, training forward vs rollout: with replay {with_replay:.4f}, "
        f"without {without:.4f}"
    )
    return 0 if with_replay == 0.0 and without > 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
