"""The `moekit` command: argparse subcommands over plain library functions.

moekit train     train (or --resume) the makeMoE language model
moekit generate  sample text from a checkpoint
moekit eval      validation loss and perplexity of a checkpoint
moekit upcycle   a dense run's checkpoint -> an MoE run of E copies of each feed-forward
moekit import-makemoe  makeMoE's saved weights -> a moekit checkpoint
moekit bench     the MoE layer and language model against the dense limit and the seeds
moekit info      the versions, threads and kernels this machine gives moekit
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__
from ._extras import MissingExtraError, require


def _flag_type(annotation: str):
    """(argparse type, is_optional) from a dataclass field's string annotation."""
    optional = "None" in annotation
    base = annotation.replace("| None", "").strip()
    return {"int": int, "float": float, "str": str, "bool": bool}[base], optional


def add_config_flags(parser: argparse.ArgumentParser, cls, skip: set[str]) -> None:
    """One kebab-case flag per dataclass field, with its help; unset flags stay unset."""
    from .train.config import ALIASES

    for f in fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        kind, optional = _flag_type(f.type if isinstance(f.type, str) else f.type.__name__)
        flag = "--" + f.name.replace("_", "-")
        aliases = ["--" + old.replace("_", "-") for old, new in ALIASES.items() if new == f.name]
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata['help']} (default: {default})"
        if kind is bool:
            parser.add_argument(
                flag,
                *aliases,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                *aliases,
                type=kind,
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=f.name.upper() + ("|none" if optional else ""),
            )


def _train(args: argparse.Namespace) -> int:
    from .lm.config import MODEL_FIELDS, TRAIN_FIELDS, build_config
    from .lm.train import train
    from .parallel.training import end_distributed

    overrides = {k: v for k, v in vars(args).items() if k in MODEL_FIELDS | TRAIN_FIELDS}
    cfg = build_config(args.preset, args.config, **overrides)
    if args.resume:  # model flags left out come from the checkpoint (e.g. an upcycled run)
        saved = _saved_model_config(cfg.out)
        if saved is not None:
            cfg = build_config(args.preset, args.config, model_base=saved, **overrides)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    if main_rank:
        print(f"moekit train: preset {args.preset}, out {cfg.out}, {cfg.steps} steps")

    def on_eval(record: dict) -> None:  # makeMoE's line: both splits' estimates
        line = (
            f"step {record['step']}: train loss {record['train_split_loss']:.4f}, "
            f"val loss {record['val_loss']:.4f}"
        )
        if record.get("sample"):
            line += "\n" + "\n".join("    " + row for row in record["sample"].splitlines())
        (print if not cfg.progress else _tqdm_write)(line)

    result = train(cfg, resume=args.resume, on_eval=on_eval)
    end_distributed()
    if main_rank:
        print(
            f"done: step {result.step}, checkpoint {result.checkpoint}, run directory {result.out}"
        )
    return 0


def _saved_model_config(out: str):
    """The model config of the newest valid checkpoint in `out`, or None."""
    from .lm.model import LMConfig
    from .train.files import latest_checkpoint

    checkpoint = latest_checkpoint(Path(out))
    return None if checkpoint is None else LMConfig.from_dict(checkpoint.state["model_config"])


def _tqdm_write(line: str) -> None:
    require("tqdm.auto", "train", "The progress bar").tqdm.write(line)


def _generate(args: argparse.Namespace) -> int:
    from .lm.inference import generate_text, load_model

    loaded = load_model(args.checkpoint, device=args.device)
    generate_text(
        loaded,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.seed,
        on_text=lambda piece: print(piece, end="", flush=True),  # tokens as they come
    )
    print()
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .lm.inference import evaluate, load_model

    loaded = load_model(args.checkpoint, device=args.device)
    result = evaluate(loaded, args.data, args.eval_iters, args.seed)
    print(
        f"step {result['step']}: val loss {result['val_loss']:.4f}, "
        f"perplexity {result['perplexity']:.3f}"
    )
    return 0


def _upcycle(args: argparse.Namespace) -> int:
    from .lm.convert import upcycle_checkpoint

    path = upcycle_checkpoint(
        args.checkpoint, args.out, args.num_experts, args.top_k, seed=args.seed
    )
    print(
        f"upcycled {args.checkpoint} to {args.num_experts} experts: checkpoint {path} "
        "(optimizer state fresh)\n"
        f"train on: moekit train --resume --out {args.out} <the dense run's training flags>"
    )
    return 0


def _import_makemoe(args: argparse.Namespace) -> int:
    from .lm.convert import import_makemoe

    path = import_makemoe(
        args.file, args.out, data=args.data, top_k=args.top_k, dropout=args.dropout
    )
    print(f"imported {args.file}: checkpoint {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import (
        CPU_SHAPES,
        CUDA_SHAPES,
        BenchOptions,
        LayerShape,
        run_bench,
        run_ep_bench,
        shapes_named,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    default = CUDA_SHAPES if args.device == "cuda" else CPU_SHAPES
    names = args.shapes if args.shapes is not None else ("B,C" if args.expert_parallel else default)
    shapes = shapes_named(names)
    custom = (args.d_model, args.d_hidden, args.num_experts, args.top_k, args.tokens)
    if any(v is not None for v in custom):
        if any(v is None for v in custom):
            raise ValueError(
                "a custom shape needs all of --d-model, --d-hidden, --num-experts, --top-k, "
                "--tokens"
            )
        shapes.append(LayerShape("custom", *custom))
    overrides = {
        key: value
        for key, value in (
            ("shapes", shapes),
            ("dtypes", args.dtypes and args.dtypes.split(",")),
            ("activations", args.activations and args.activations.split(",")),
            ("rounds", args.rounds),
            ("device", args.device),
        )
        if value is not None
    }
    for flag, part in (
        ("no_lm", "lm"),
        ("no_hf_peer", "hf_peer"),
        ("no_hf_backends", "hf_backends"),
        ("no_finetune", "finetune"),
    ):
        if getattr(args, flag):  # the --no-* flags turn a part off; else the preset decides
            overrides[part] = False
    options = BenchOptions.quick(**overrides) if args.quick else BenchOptions(**overrides)
    for dtype in options.dtypes or ():
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtypes: {dtype!r} must be float32 or bfloat16")
    for activation in options.activations:
        if activation not in ("relu", "gelu", "swiglu"):
            raise ValueError(f"--activations: {activation!r} must be relu, gelu or swiglu")
    if args.expert_parallel:
        run_ep_bench(options, args.expert_parallel)
    else:
        run_bench(options)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .hf.finetune import finetune
    from .parallel.training import end_distributed
    from .train.config import read_toml
    from .train.finetune_config import FinetuneConfig

    names = {f.name for f in fields(FinetuneConfig)}
    values = read_toml(args.config, (FinetuneConfig,)) if args.config else {}
    if isinstance(values.get("lora_targets"), str):
        values["lora_targets"] = values["lora_targets"].split(",")
    values |= {k: v for k, v in vars(args).items() if k in names}
    if isinstance(values.get("lora_targets"), str):
        values["lora_targets"] = tuple(t for t in values["lora_targets"].split(",") if t)
    elif values.get("lora_targets") is not None:
        values["lora_targets"] = tuple(values["lora_targets"])
    missing = [f"--{n}" for n in ("model", "data", "out") if n not in values]
    if missing:
        raise ValueError(f"moekit finetune needs {', '.join(missing)} (flags or --config)")
    cfg = FinetuneConfig(**values)
    main_rank = os.environ.get("RANK", "0") == "0"

    def on_eval(record: dict) -> None:  # printed with or without the progress bar
        line = f"step {record['step']}: val loss {record['val_loss']:.4f}"
        if "train_loss" in record:
            line += f" (train {record['train_loss']:.4f})"
        (print if not cfg.progress else _tqdm_write)(line)

    result = finetune(cfg, resume=args.resume, on_eval=on_eval)
    end_distributed()
    if main_rank and result.is_main:
        print(f"fine-tuned {result.step} steps; {', '.join(map(str, result.final))}")
    return 0


def _info(args: argparse.Namespace) -> int:
    if args.hf is not None:
        from .hf.report import format_coverage, saved_coverage

        config, rows = saved_coverage(args.hf)
        print(f"{args.hf}: {type(config).__name__} (model_type {config.model_type})")
        print(format_coverage(rows))
        if args.verify:
            from .hf.load import load_model
            from .hf.verify import verify_experts

            model = load_model(Path(args.hf), getattr(config, "dtype", None) or torch.float32)
            print(f"verify: {verify_experts(model, Path(args.hf)).summary()}")
        return 0
    from ._device import cpu_capability, fast_bfloat16

    print(f"moekit {__version__}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}")
    print(f"threads {torch.get_num_threads()}, cuda available {torch.cuda.is_available()}")
    print(f"cpu {cpu_capability()}, native bf16 GEMM {fast_bfloat16()}")
    print(f"grouped_mm available {hasattr(F, 'grouped_mm')}")
    from .ops import triton_available

    cuda = torch.cuda.is_available() and triton_available(torch.device("cuda"))
    print(f"triton combine kernels on CUDA {cuda}")
    return 0


def _checkpoint_args(parser: argparse.ArgumentParser, seed_help: str) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run directory (its newest checkpoint) or one checkpoint",
    )
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def build_parser() -> argparse.ArgumentParser:
    from .lm.config import PRESETS, TrainConfig
    from .lm.model import LMConfig
    from .train.finetune_config import FinetuneConfig

    parser = argparse.ArgumentParser(prog="moekit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train the makeMoE language model")
    train.add_argument(
        "--preset", default="makemoe", choices=sorted(PRESETS), help="starting configuration"
    )
    train.add_argument("--config", help="a TOML file of overrides (flat keys or a [model] table)")
    train.add_argument(
        "--resume", action="store_true", help="continue from the newest valid checkpoint in --out"
    )
    add_config_flags(train, TrainConfig, skip={"model"})
    add_config_flags(train, LMConfig, skip={"vocab_size"})
    train.set_defaults(run=_train)

    generate = commands.add_parser("generate", help="sample text from a checkpoint")
    _checkpoint_args(generate, seed_help="sampling seed")
    generate.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    generate.add_argument("--max-new-tokens", type=int, default=500, help="tokens to sample")
    generate.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    generate.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    generate.set_defaults(run=_generate)

    evaluate = commands.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    _checkpoint_args(evaluate, seed_help="seed of the evaluation batches")
    evaluate.add_argument("--data", default=None, help="text file (default: the run's data)")
    evaluate.add_argument(
        "--eval-batches",
        "--eval-iters",
        dest="eval_iters",
        type=int,
        default=None,
        help="batches (default: the run's)",
    )
    evaluate.set_defaults(run=_eval)

    upcycle = commands.add_parser(
        "upcycle",
        help="sparse upcycling: a dense run (--num-experts 1) -> an MoE run of E copies",
        description="Copy each layer's one expert E times behind a new router (Komatsuzaki et "
        "al. 2022). The new run keeps the dense step, data stream and history; the optimizer "
        "state is fresh. Continue with moekit train --resume --out OUT (the model comes from "
        "the checkpoint) and the dense run's training flags.",
    )
    upcycle.add_argument(
        "--checkpoint", required=True, help="a dense run directory (its newest checkpoint) or one"
    )
    upcycle.add_argument("--num-experts", type=int, required=True, help="experts E per layer")
    upcycle.add_argument(
        "--top-k", type=int, default=None, help="experts per token (default: min(2, E))"
    )
    upcycle.add_argument("--out", required=True, help="the new run directory")
    upcycle.add_argument("--seed", type=int, default=0, help="seed of the new routers' weights")
    upcycle.set_defaults(run=_upcycle)

    makemoe = commands.add_parser(
        "import-makemoe",
        help="makeMoE's weights (torch.save(model.state_dict(), FILE)) -> a moekit checkpoint",
    )
    makemoe.add_argument("file", help="the .pt file of makeMoE's model.state_dict()")
    makemoe.add_argument("--out", required=True, help="the new run directory")
    makemoe.add_argument(
        "--data",
        default=None,
        help="makeMoE's training text, whose characters are the vocabulary (default: "
        "tinyshakespeare)",
    )
    makemoe.add_argument("--top-k", type=int, default=2, help="experts per token (default: 2)")
    makemoe.add_argument(
        "--dropout", type=float, default=0.1, help="dropout for further training (default: 0.1)"
    )
    makemoe.set_defaults(run=_import_makemoe)

    bench = commands.add_parser("bench", help="benchmark against the dense limit and the seeds")
    bench.add_argument("--quick", action="store_true", help="float32 ReLU, few rounds: < 1 min")
    bench.add_argument(
        "--shapes",
        help="named shapes, comma-separated, or empty: A (makeMoE), B, C (small), M (Mixtral-8x7B),"
        " D (DeepSeek-V2-Lite), O (OLMoE), Q (Qwen3-30B-A3B) (default: A,B,C; --device cuda: "
        "M,D,O,Q,B,C; with --expert-parallel: B,C)",
    )
    bench.add_argument(
        "--dtypes",
        help="float32,bfloat16 (default: both where the CPU has a native bf16 GEMM, "
        "else float32; --quick: float32)",
    )
    bench.add_argument("--activations", help="relu,swiglu (default: both; --quick: relu)")
    bench.add_argument("--rounds", type=int, help="timing rounds per case (median)")
    bench.add_argument("--no-lm", action="store_true", help="skip the language-model benchmark")
    bench.add_argument(
        "--no-hf-peer",
        action="store_true",
        help="skip transformers' Mixtral block (timed at SwiGLU shapes when installed)",
    )
    bench.add_argument(
        "--no-hf-backends",
        action="store_true",
        help="skip the transformers backends table (eager, grouped_mm, moekit, patched)",
    )
    bench.add_argument(
        "--no-finetune",
        action="store_true",
        help="skip the fine-tuning tables (expert LoRA and fine-tune steps vs transformers + "
        "PEFT; SFT packed vs padded vs TRL)",
    )
    bench.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument(
        "--expert-parallel",
        type=int,
        default=0,
        metavar="R",
        help="under torchrun --nproc-per-node R: the expert-parallel step and its all-to-all",
    )
    for flag in ("--d-model", "--d-hidden", "--num-experts", "--top-k", "--tokens"):
        bench.add_argument(flag, type=int, help="a custom shape (all five flags)")
    bench.set_defaults(run=_bench)

    tune = commands.add_parser(
        "finetune",
        help="fine-tune a saved transformers MoE model on moekit's engine (LoRA or full)",
    )
    tune.add_argument("--config", help="a TOML file of flags (keys: flag names, _ for -)")
    tune.add_argument(
        "--resume", action="store_true", help="continue from the newest valid checkpoint in --out"
    )
    tune.add_argument(
        "--lora-targets",
        default=argparse.SUPPRESS,
        help="with --lora-rank, comma-separated: experts, attention, router (default: experts)",
    )
    tune.add_argument(
        "--router-bias-update",
        type=float,
        nargs="?",
        const=1e-3,
        default=argparse.SUPPRESS,
        metavar="RATE",
        help="aux-loss-free balancing (full fine-tunes): move each router's correction bias by "
        "RATE (1e-3) toward equal load after every step (routers with a correction bias)",
    )
    add_config_flags(tune, FinetuneConfig, skip=set())
    tune.set_defaults(run=_finetune)

    info = commands.add_parser("info", help="print versions, threads and available kernels")
    info.add_argument(
        "--hf",
        metavar="MODEL_DIR",
        help="instead: each MoE block of a saved transformers model and whether moekit's "
        "experts backend and patch_model cover it (reads the config and the safetensors "
        "headers, not the weights)",
    )
    info.add_argument(
        "--verify",
        action="store_true",
        help="with --hf: load the model and check every expert's weights against the files "
        "(and report experts that are exact copies)",
    )
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        return args.run(args)
    except (ValueError, RuntimeError, FloatingPointError, MissingExtraError) as err:
        from .parallel.training import defer_to_rank_0

        if not isinstance(err, RuntimeError):  # a RuntimeError is this rank's own failure
            defer_to_rank_0()  # the rest every rank meets alike: rank 0 alone says it
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)
        return 1
