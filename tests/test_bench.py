"""`moekit bench`: the instrument runs and reports; its memory counter counts what it should.

No timing asserts: only that every case is measured and the ratios are the ones printed.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from moekit.bench import BenchOptions, LayerShape, run_bench
from moekit.bench.hf_peer import available as hf_available
from moekit.bench.layer import HF_CASE, PATCHED_CASE
from moekit.bench.seed_loop import SeedLoopMoE
from moekit.bench.timing import peak_extra_bytes
from moekit.cli import main

TINY = LayerShape("tiny", 16, 32, 4, 2, 24)


def test_peak_extra_bytes_counts_temporaries_not_existing_tensors():
    existing = torch.zeros(1000)

    def step():
        a = torch.empty(256, dtype=torch.float32)  # 1 KiB, freed at return
        b = torch.empty(512, dtype=torch.float32)  # 2 KiB, peak 3 KiB while both live
        del a
        c = existing.view(10, 100)  # a view: no new storage
        return b.sum() + c.sum()

    # the sums (4-byte scalars) come after a is freed; existing's storage is not counted
    assert peak_extra_bytes(step) == 3 * 1024


def test_peak_extra_bytes_gives_no_credit_for_freeing_what_existed():
    held = [torch.empty(4096, dtype=torch.float32)]  # 16 KiB from before the call

    def step():
        held.clear()  # frees the 16 KiB: the baseline is what existed, not what is left
        return torch.empty(1024, dtype=torch.float32)  # 4 KiB

    assert peak_extra_bytes(step) == 4 * 1024


def test_peak_extra_bytes_is_repeatable_on_a_training_step():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    x = torch.randn(128, 64, requires_grad=True)

    def step():
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        mlp(x).backward(torch.ones(128, 64))

    step()
    peaks = {peak_extra_bytes(step, mlp) for _ in range(5)}
    assert len(peaks) == 1
    # at least the two [128, 256] activations autograd keeps (hidden, its ReLU output)
    assert peaks.pop() >= 2 * 128 * 256 * 4


def test_peak_extra_bytes_leaves_out_the_parameter_gradients():
    linear = torch.nn.Linear(256, 256, bias=False)  # its gradient: 256 KiB
    x = torch.randn(4, 256)

    def step():
        linear(x).sum().backward()

    peak = peak_extra_bytes(step, linear)
    assert linear.weight.grad is not None
    assert 0 < peak < 256 * 256 * 4 // 4  # the activations are a few KiB


def test_seed_loop_matches_the_moe_layer_with_copied_weights():
    from moekit import MoE

    seed = SeedLoopMoE(16, 32, 4, 2, "relu")
    layer = MoE(16, 4, 2, 32, "relu", router="softmax")
    with torch.no_grad():
        layer.router.gate.weight.copy_(seed.gate.weight)
        for e, expert in enumerate(seed.experts):
            layer.experts.w1[e].copy_(expert.fc1.weight.t())
            layer.experts.w2[e].copy_(expert.fc2.weight.t())
    x = torch.randn(24, 16)
    torch.testing.assert_close(seed(x), layer(x).output, atol=1e-5, rtol=1e-4)


def test_run_bench_measures_every_case(capsys):
    options = BenchOptions(
        shapes=[TINY],
        dtypes=["float32"],
        activations=["swiglu"],
        rounds=1,
        lm=False,
        hf_backends=False,
        finetune=False,  # its tables have their own tests
    )
    results = run_bench(options)["layer"]
    cases = {r.case: r for r in results}
    assert set(cases) == {
        "moekit",
        "limit",
        "router",
        "moekit forward",
        "limit forward",
        "seed loop",
    } | ({HF_CASE, PATCHED_CASE} if hf_available() else set())  # SwiGLU: HF's Mixtral block
    assert cases["moekit"].ratio == pytest.approx(cases["moekit"].ms / cases["limit"].ms)
    assert cases["moekit"].peak_bytes > 0 and cases["limit"].peak_bytes > 0
    assert cases["moekit"].tflops > 0 and cases["router"].tflops is None
    out = capsys.readouterr().out
    assert "x LIMIT" in out and "seed loop" in out and "torch " in out and "TFLOP/s" in out


def test_cli_bench_custom_shape_and_language_model(capsys, monkeypatch):
    from moekit.bench import lm

    monkeypatch.setattr(lm, "BATCH", 2)  # a cheap language-model step
    code = main(
        ["bench", "--quick", "--shapes", "", "--d-model", "8", "--d-hidden", "16"]
        + ["--num-experts", "3", "--top-k", "2", "--tokens", "5", "--rounds", "1"]
        + ["--no-hf-backends"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "custom" in out and "faster than makeMoE" in out
    assert "generate 40, KV cache" in out and "x makeMoE" in out and "(window), KV cache" in out


def test_cli_bench_rejects_a_partial_custom_shape(capsys):
    assert main(["bench", "--quick", "--no-lm", "--d-model", "8"]) == 1
    assert "--num-experts" in capsys.readouterr().err


def test_bfloat16_is_benchmarked_only_where_it_has_a_native_gemm(monkeypatch):
    import moekit.bench as bench

    lines = []
    monkeypatch.setattr(bench, "fast_bfloat16", lambda device: False)
    assert bench.default_dtypes(torch.device("cpu"), lines.append) == ["float32"]
    assert "bfloat16 skipped" in lines[0] and "--dtypes bfloat16" in lines[0]
    monkeypatch.setattr(bench, "fast_bfloat16", lambda device: True)
    assert bench.default_dtypes(torch.device("cpu"), lines.append) == ["float32", "bfloat16"]
    assert len(lines) == 1


@pytest.mark.distributed
def test_expert_parallel_bench_under_torchrun():
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "moekit", "bench", "--expert-parallel", "2", "--shapes", "", "--rounds", "1"]
    cmd += [
        "--d-model",
        "16",
        "--d-hidden",
        "32",
        "--num-experts",
        "4",
        "--top-k",
        "2",
        "--tokens",
        "64",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines()]
    rows = [row for row in lines if row and row[0] == "custom"]
    # rank 0 alone prints; each activation without and with a shared expert
    assert [(row[1], row[2]) for row in rows] == [
        ("relu", "0"),
        ("relu", "1"),
        ("swiglu", "0"),
        ("swiglu", "1"),
    ]
    for row in rows:
        _, _, shared, ranks, step_ms, overlap, exchange_ms, share, single_ms, speedup = row[:10]
        all_cores_ms, vs_all_cores = row[10:]
        assert ranks == "2"
        assert (overlap == "-") == (shared == "0")
        assert float(share.rstrip("%")) == pytest.approx(
            100 * float(exchange_ms) / float(step_ms), abs=1
        )
        assert float(speedup) == pytest.approx(float(single_ms) / float(step_ms), abs=0.01)
        assert float(vs_all_cores) == pytest.approx(float(all_cores_ms) / float(step_ms), abs=0.01)


def test_expert_parallel_bench_outside_torchrun_is_an_error(capsys):
    assert main(["bench", "--expert-parallel", "2", "--quick"]) == 1
    assert "torchrun" in capsys.readouterr().err


def test_hf_mixtral_peer_computes_the_same_layer():
    """The benchmark's Hugging Face peer holds moekit's weights: same output and input grad."""
    pytest.importorskip("transformers")
    from moekit import MoE
    from moekit.bench.hf_peer import mixtral_peer

    moe = MoE(16, 4, 2, 24, "swiglu", router="softmax")  # float32: grouped_mm has no float64
    peer = mixtral_peer(moe)
    x = torch.randn(11, 16, requires_grad=True)
    upstream = torch.randn(11, 16)
    ours = torch.autograd.grad((moe(x).output * upstream).sum(), x)[0]
    theirs = torch.autograd.grad((peer(x) * upstream).sum(), x)[0]
    torch.testing.assert_close(peer(x), moe(x).output, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="SwiGLU"):
        mixtral_peer(MoE(16, 4, 2, 24, "relu"))


def test_named_gpu_shapes_and_tflops():
    from moekit.bench import shapes_named
    from moekit.bench.layer import Result, layer_flops

    q = shapes_named("Q")[0]
    assert (q.d_model, q.d_hidden, q.num_experts, q.top_k, q.tokens) == (2048, 768, 128, 8, 16384)
    # SwiGLU: 2 * N*k * (d*2h + h*d) per forward, x3 with the backward
    assert layer_flops(q, "swiglu", True) == 3 * 2 * 16384 * 8 * (2048 * 1536 + 768 * 2048)
    result = Result(q, "bfloat16", "swiglu", "moekit", ms=1000.0, tokens=q.tokens)
    assert result.tflops == pytest.approx(layer_flops(q, "swiglu", True) / 1e12)
    with pytest.raises(ValueError, match="unknown shape"):
        shapes_named("A,Z")


@pytest.mark.skipif(not hf_available(), reason="needs transformers")
def test_hf_backends_table_times_every_case():
    from moekit.bench import format_hf_backends_table
    from moekit.bench.hf_backends import bench_hf_backends

    (result,) = bench_hf_backends(("gpt_oss",), rounds=1, warmup=0, batch=1, length=8)
    assert set(result.ms) == {"eager", "grouped_mm", "moekit", "patched"}
    assert all(ms > 0 for ms in result.ms.values())
    table = format_hf_backends_table([result])
    assert "gpt_oss" in table and "moekit/gmm" in table


@pytest.mark.skipif(not hf_available(), reason="needs transformers")
def test_hf_compiled_table_times_every_case():
    from moekit.bench import format_hf_compiled_table
    from moekit.bench.hf_backends import COMPILED_CASES, bench_hf_compiled

    (result,) = bench_hf_compiled(("qwen3_moe",), rounds=1, warmup=1, batch=1, length=8)
    assert tuple(result.ms) == COMPILED_CASES
    assert all(ms > 0 for ms in result.ms.values())
    table = format_hf_compiled_table([result])
    assert "qwen3_moe" in table and "moekit eager/compiled" in table


def test_cli_bench_quick_leaves_the_transformers_table_out(monkeypatch):
    """`--quick` keeps its preset's parts (no transformers backends table); `--no-*` flags turn
    parts off in either mode."""
    import moekit.bench as bench
    from moekit.cli import main

    seen = []
    monkeypatch.setattr(bench, "run_bench", lambda options: seen.append(options))
    assert main(["bench", "--quick"]) == 0
    assert main(["bench", "--no-hf-backends", "--no-lm"]) == 0
    assert main(["bench"]) == 0
    quick, off, full = seen
    assert not quick.hf_backends and not quick.finetune and quick.lm
    assert not off.hf_backends and not off.lm and off.hf_peer
    assert full.hf_backends and full.lm


@pytest.mark.skipif(not hf_available(), reason="needs transformers")
def test_finetune_table_times_and_weighs_both_sides():
    pytest.importorskip("peft")
    from moekit.bench import format_finetune_table
    from moekit.bench.finetune import bench_expert_lora

    result = bench_expert_lora(
        rounds=1, warmup=0, d_model=32, d_hidden=16, num_experts=4, top_k=2, tokens=16, rank=2
    )
    assert set(result.ms) == set(result.peak_bytes) == {"transformers", "moekit"}
    assert all(v > 0 for v in (*result.ms.values(), *result.peak_bytes.values()))
    table = format_finetune_table([result])
    assert "expert LoRA layer" in table and "memory moekit/tf" in table


@pytest.mark.skipif(not hf_available(), reason="needs transformers")
def test_sft_table_times_moekit_packed_padded_and_trl():
    for module in ("peft", "tokenizers", "datasets", "trl"):
        pytest.importorskip(module)
    from moekit.bench.sft import CASES, bench_sft, format_sft_table

    results = bench_sft(rounds=1, records=16, seq_len=256, steps=1)
    assert [r.case for r in results] == list(CASES)
    assert all(min(r.tokens_per_s, r.total_tokens_per_s, r.real_tokens) > 0 for r in results)
    packed, padded, trl = results
    assert (packed.rows, packed.width) == (4, 256)  # fixed rows of seq_len
    assert padded.width <= 256 and 0.0 <= padded.padding < 1.0
    assert trl.rows == 1 and trl.padding == 0.0  # padding-free: the rows flattened, no padding
    table = format_sft_table(results)
    assert all(case in table for case in CASES) and "x moekit packed" in table


def test_quant_memory_table_runs_a_process_per_scheme():
    """One process a scheme, then two ranks at EP 2 under torchrun."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from moekit.bench.quant import SCHEMES, bench_quant_memory, format_quant_memory_table

    results = bench_quant_memory(layers=1, experts=4, d_model=64, d_hidden=64)
    assert [(r.scheme, r.ranks) for r in results] == [(s, n) for n in (1, 2) for s in SCHEMES]
    assert all(r.peak_rss_mb > 0 and r.peak_anon_mb > 0 and r.step_s > 0 for r in results)
    table = format_quant_memory_table(results)
    assert "nf4" in table and "peak anon MB" in table and "x 1 proc" in table


def test_quant_memory_table_is_skipped_in_one_line_where_memory_is_short(monkeypatch):
    pytest.importorskip("transformers")
    from moekit import bench
    from moekit.bench import quant

    monkeypatch.setattr(quant, "available_memory", lambda: 4 * 2**30)
    lines = []
    assert bench._quant_table(echo=lines.append) == []
    assert "3.63B weights" in lines[0] and "activation checkpointing" in lines[0]
    assert lines[1] == (
        "quantised experts: skipped: the float32 cases need ~18 GB of memory, 4 GB is available"
    )


def test_quant_memory_model_is_written_as_transformers_saves_it(tmp_path):
    """The benchmark's checkpoint, written a shard at a time: the names and shapes of
    transformers' own `save_pretrained` of that config (an expert a tensor), in several
    files with an index, and transformers loads it."""
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    from moekit.bench.quant import _config, _write_model, checkpoint_shapes

    config = _config(2, 4, 64, 32, 320)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "ref")
    with safe_open(str(tmp_path / "ref" / "model.safetensors"), "pt") as f:
        want = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert checkpoint_shapes(config) == want
    model_dir = _write_model(tmp_path / "bench", 2, 4, 64, 32, shard_mb=0)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want) and len(set(index["weight_map"].values())) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert loaded.model.layers[1].mlp.experts.down_proj.shape == (4, 64, 32)
    assert torch.equal(loaded.model.norm.weight, torch.ones(64))


def test_decode_table_runs_every_case_and_checks_the_tokens():
    pytest.importorskip("transformers")
    from moekit.bench.decode import CASES, bench_decode, format_decode_table

    results = bench_decode(batches=(1, 2), new_tokens=3, rounds=1)
    assert [(r.case, r.batch) for r in results] == [(c, b) for b in (1, 2) for c in CASES]
    assert all(r.tokens_per_s > 0 and r.same_as_eager for r in results)
    assert "x grouped_mm" in format_decode_table(results)
