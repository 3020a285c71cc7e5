"""moekit in one minute: the layers, their losses and diagnostics, and a few training steps.

Run: python examples/quickstart.py
"""

import torch

from moekit import MoE, SimpleMoELayer, SoftMoE, SparseMoE, update_router_biases

torch.manual_seed(0)
x = torch.randn(4, 64, 128)  # [B, T, d]

# 1. the general layer: any router, any experts, optional capacity
for router in ["softmax", "noisy", "switch", "sigmoid", "expert_choice"]:
    top_k = 1 if router == "switch" else 2
    layer = MoE(128, num_experts=8, top_k=top_k, router=router, activation="swiglu")
    out, aux_loss = layer(x)
    stats = layer.stats
    print(
        f"{router:>13}: out {tuple(out.shape)}  aux {aux_loss.item():.4f}  "
        f"load {stats.tokens_per_expert.tolist()}  entropy {stats.router_entropy:.3f}"
    )

# 2. the seeds' names
print("SimpleMoELayer", tuple(SimpleMoELayer(128, 8, 2)(x).shape))
print("SparseMoE (capacity 1.0)", tuple(SparseMoE(128, 8, 2, capacity_factor=1.0)(x).shape))
print("SoftMoE", tuple(SoftMoE(128, num_experts=8, num_slots=4)(x).shape))

# 3. a few steps fitting a random target: the loss goes down, the biases balance the load
layer = MoE(128, 8, 2, router="sigmoid", capacity_factor=1.25)
target = torch.randn_like(x)
opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
for step in range(30):
    out, aux_loss = layer(x)
    loss = torch.nn.functional.mse_loss(out, target) + aux_loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    update_router_biases(layer)
    if step % 10 == 0 or step == 29:
        dropped = layer.stats.dropped_fraction.item()
        print(f"step {step:2d}  loss {loss.item():.4f}  dropped {dropped:.3f}")
