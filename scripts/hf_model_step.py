"""A transformers model's training step before and after `moekit.hf.patch_model`, interleaved
(random weights from a config, no downloads): `python scripts/hf_model_step.py [--device cuda]`.
Prints the median step time of each family at a small but not tiny size and the ratio."""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

from moekit.bench.timing import interleaved_medians
from moekit.hf import patch_model


def models(size: dict) -> dict:
    import transformers as tf

    common = dict(
        vocab_size=1024,
        hidden_size=size["d"],
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    h, e, k = size["h"], size["experts"], size["top_k"]
    return {
        "Mixtral": lambda: tf.MixtralForCausalLM(
            tf.MixtralConfig(
                intermediate_size=h, num_local_experts=e, num_experts_per_tok=k, **common
            )
        ),
        "Qwen2-MoE": lambda: tf.Qwen2MoeForCausalLM(
            tf.Qwen2MoeConfig(
                intermediate_size=h,
                moe_intermediate_size=h,
                shared_expert_intermediate_size=2 * h,
                num_experts=e,
                num_experts_per_tok=k,
                **common,
            )
        ),
        "Qwen3-MoE": lambda: tf.Qwen3MoeForCausalLM(
            tf.Qwen3MoeConfig(
                intermediate_size=h,
                moe_intermediate_size=h,
                num_experts=e,
                num_experts_per_tok=k,
                **common,
            )
        ),
        "OLMoE": lambda: tf.OlmoeForCausalLM(
            tf.OlmoeConfig(
                intermediate_size=h, num_experts=e, num_experts_per_tok=k, eos_token_id=1, **common
            )
        ),
        "DeepSeek-V3": lambda: tf.DeepseekV3ForCausalLM(
            tf.DeepseekV3Config(
                intermediate_size=4 * h,
                moe_intermediate_size=h,
                n_routed_experts=e,
                n_shared_experts=1,
                num_experts_per_tok=k,
                n_group=4,
                topk_group=2,
                first_k_dense_replace=0,
                kv_lora_rank=64,
                q_lora_rank=64,
                qk_rope_head_dim=16,
                qk_nope_head_dim=16,
                v_head_dim=32,
                **{**common, "num_key_value_heads": 8},
            )
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    size = dict(d=256, h=256, experts=16, top_k=4)
    dtype = getattr(torch, args.dtype)
    print(
        f"d={size['d']} h={size['h']} E={size['experts']} k={size['top_k']} 2 layers, "
        f"batch {args.batch} x {args.seq} tokens, {args.dtype}, {args.device}"
    )
    for name, build in models(size).items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build().to(args.device, dtype).train()
        patched = copy.deepcopy(model)
        patch_model(patched)
        ids = torch.randint(0, 1024, (args.batch, args.seq), device=args.device)

        def step(m, ids=ids):
            def run():
                m.zero_grad(set_to_none=True)
                m(ids, labels=ids).loss.backward()

            return run

        t = interleaved_medians(
            {"transformers": step(model), "patched": step(patched)},
            rounds=args.rounds,
            device=args.device,
        )
        print(
            f"{name:12s} transformers {t['transformers']:8.1f} ms  patched {t['patched']:8.1f} ms"
            f"  ratio {t['patched'] / t['transformers']:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
