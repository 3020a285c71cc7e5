"""Training plots written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from .._extras import require


def pyplot():
    """matplotlib.pyplot on the Agg backend (PNG files, no display)."""
    require("matplotlib", "train", "Plotting the training curves").use("Agg")
    return require("matplotlib.pyplot", "train", "Plotting the training curves")


def plot_losses(evals: list[dict], path: Path) -> Path:
    """Train and val loss at each evaluation: evals = [{"step", "train_loss", "val_loss"}]."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [e["step"] for e in evals]
    ax.plot(steps, [e["train_loss"] for e in evals], label="train")
    ax.plot(steps, [e["val_loss"] for e in evals], label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_load(steps: list[int], load: list[list[list[float]]], path: Path) -> Path:
    """Fraction of routed tokens per expert, one panel per layer, over training.

    Args:
        steps: The step closing each measurement window [S] (a window starts at the step before).
        load: [S][layers][experts] fractions (each layer's row sums to 1).
    """
    plt = pyplot()
    num_layers, num_experts = len(load[0]), len(load[0][0])
    edges = [0, *steps]  # window s covers (steps[s-1], steps[s]]
    fig, axes = plt.subplots(num_layers, 1, figsize=(8, 1.0 + 1.1 * num_layers), squeeze=False)
    uniform = 1.0 / num_experts
    for layer, ax in enumerate(axes[:, 0]):
        grid = [[load[s][layer][e] for s in range(len(steps))] for e in range(num_experts)]
        mesh = ax.pcolormesh(
            edges,
            [e - 0.5 for e in range(num_experts + 1)],
            grid,
            cmap="viridis",
            vmin=0.0,
            vmax=min(1.0, 3 * uniform),
        )
        ax.invert_yaxis()
        ax.set_ylabel(f"layer {layer}\nexpert")
        fig.colorbar(mesh, ax=ax, label="fraction")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"expert load per layer (uniform = {uniform:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_routing_overlap(evals: list[dict], path: Path) -> Path:
    """Per MoE layer, the fraction of the base model's top-k choices the model keeps, at each
    evaluation: evals = [{"step", "layer{l}_routing_overlap", ...}]."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [e["step"] for e in evals]
    layers = sorted(
        int(k.removeprefix("layer").split("_")[0])
        for k in evals[0]
        if k.startswith("layer") and k.endswith("_routing_overlap")
    )
    for layer in layers:
        key = f"layer{layer}_routing_overlap"
        ax.plot(steps, [e.get(key, float("nan")) for e in evals], label=f"layer {layer}")
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("top-k overlap with the base")
    ax.set_title("routing drift (1: the base model's routing)")
    ax.grid(alpha=0.3)
    if len(layers) <= 12:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
