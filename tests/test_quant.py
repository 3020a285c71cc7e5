"""Quantised frozen experts: NF4 and int8 against a reference quantiser written here, the
grouped pass with per-expert dequantisation against a float64 loop, and every family on the
experts backend against transformers' own eager experts holding the dequantised weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from moekit.quant import NF4_LEVELS, QuantizedExperts, quant_grouped_linear


def reference_nf4(w: torch.Tensor):
    """Per expert: flatten, pad to 64, per block absmax, nearest level by argmin, pack two a
    byte (high nibble first)."""
    datas, scales = [], []
    for expert in w.double():
        flat = expert.reshape(-1).tolist()
        flat += [0.0] * (-len(flat) % 64)
        codes, absmaxes = [], []
        for start in range(0, len(flat), 64):
            block = flat[start : start + 64]
            absmax = max(max(abs(v) for v in block), 1e-12)
            absmaxes.append(absmax)
            for v in block:
                distances = [abs(v / absmax - level) for level in NF4_LEVELS.tolist()]
                codes.append(distances.index(min(distances)))
        datas.append([codes[i] * 16 + codes[i + 1] for i in range(0, len(codes), 2)])
        scales.append(absmaxes)
    return torch.tensor(datas, dtype=torch.uint8), torch.tensor(scales, dtype=torch.float64)


def reference_int8(w: torch.Tensor):
    w = w.double()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # [E, d_out]
    return torch.round(w / scales[:, None, :]).clamp(-127, 127), scales


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 24), (2, 7, 5), (4, 32, 64)])
def test_nf4_matches_the_reference_quantiser(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    q = QuantizedExperts.quantize(w, "nf4")
    data, scales = reference_nf4(w)
    torch.testing.assert_close(q.scales.double(), scales, rtol=1e-6, atol=0)
    # a value exactly between two levels may round either way in float32: allow a few
    assert (q.data != data).float().mean() < 0.01
    deq = q.dequantize(torch.float64)
    assert deq.shape == w.shape
    blocks = (w.reshape(shape[0], -1).abs().max() / 1).item()
    assert (deq - w.double()).abs().max() <= 0.2 * blocks  # 4 bits: coarse, bounded


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 24), (2, 7, 5)])
def test_int8_matches_the_reference_quantiser(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    q = QuantizedExperts.quantize(w, "int8")
    data, scales = reference_int8(w)
    torch.testing.assert_close(q.scales.double(), scales, rtol=1e-6, atol=0)
    assert (q.data.double() != data).float().mean() < 0.01
    torch.testing.assert_close(
        q.dequantize(torch.float64), data * scales[:, None, :], rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("sizes", [[3, 0, 5, 1], [0, 0, 7, 0], [0, 0, 0, 0], [2, 2, 2, 2]])
def test_quant_grouped_linear_equals_a_float64_loop(scheme, sizes):
    """rows @ w[e] per segment (empty experts, all rows on one expert, no rows), forward and
    the rows' gradient against a loop over the dequantised weights in float64."""
    generator = torch.Generator().manual_seed(len(sizes) + sum(sizes))
    q = QuantizedExperts.quantize(torch.randn(4, 6, 10, generator=generator), scheme)
    rows = torch.randn(sum(sizes), 6, generator=generator, requires_grad=True)
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    out = quant_grouped_linear(rows, q, offsets)
    upstream = torch.randn(out.shape, generator=generator)
    (out * upstream).sum().backward()
    weights = q.dequantize(torch.float64)
    want, want_grad, start = [], [], 0
    for e, size in enumerate(sizes):
        part = rows[start : start + size].detach().double()
        want.append(part @ weights[e])
        want_grad.append(upstream[start : start + size].double() @ weights[e].T)
        start += size
    torch.testing.assert_close(out.double(), torch.cat(want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows.grad.double(), torch.cat(want_grad), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("shape", [(5, 7, 9), (3, 16, 24)])
def test_the_grouped_pass_dequantises_every_expert_into_one_buffer(scheme, shape):
    """Expert after expert in the same buffer (an nf4 tail padded past d_in * d_out, the
    values of the expert before): each equals that expert dequantised on its own."""
    from moekit.quant import _Dequantizer

    generator = torch.Generator().manual_seed(shape[0])
    w = torch.randn(*shape, generator=generator) * torch.rand(shape[0], 1, 1, generator=generator)
    q = QuantizedExperts.quantize(w, scheme)
    weight = _Dequantizer(q, torch.float32)
    pointers = set()
    for e in reversed(range(shape[0])):
        got = weight(e)
        pointers.add(got.data_ptr())
        assert torch.equal(got, q.expert(e)), e
    assert len(pointers) == 1  # one buffer for the whole stack


def test_unknown_scheme_is_one_line():
    with pytest.raises(ValueError, match="scheme must be one of nf4, int8, got 'fp4'"):
        QuantizedExperts.quantize(torch.randn(2, 4, 4), "fp4")


# --- every family the backend covers -------------------------------------------------------
transformers = pytest.importorskip("transformers")

from moekit.hf import quantize_experts  # noqa: E402
from moekit.hf.catalog import TinyModelError, dummy_inputs, moe_families, tiny_model  # noqa: E402
from moekit.hf.experts import layout_of, quantized  # noqa: E402
from moekit.hf.quantize import _experts_modules  # noqa: E402

INTERFACE = sorted(f.name for f in moe_families() if f.on_interface)


def _forward(model, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(**inputs)
    y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (y * upstream).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads


@pytest.mark.parametrize("family", INTERFACE)
def test_quantised_experts_equal_eager_on_the_dequantised_weights(family):
    """nf4 experts on the moekit backend: logits and every dense parameter's gradient equal
    transformers' eager experts holding the dequantised weights (float32, 1e-5 relative, or
    twice transformers' own grouped_mm spread); the frozen stacks get no gradient."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tiny_model(family)
    except TinyModelError as error:
        pytest.skip(f"no tiny model: {error}")
    reference = copy.deepcopy(model)
    model.set_experts_implementation("moekit")
    try:
        quantize_experts(model, "nf4")
    except ValueError as error:
        pytest.skip(str(error))
    for ours, theirs in zip(_experts_modules(model), _experts_modules(reference), strict=True):
        layout = layout_of(ours)
        for name in (layout.up_name, "down_proj"):
            weight = quantized(ours, name).dequantize()  # [E, d_in, d_out]
            weight = weight if layout.is_transposed else weight.transpose(1, 2)
            getattr(theirs, name).data.copy_(weight)
    inputs = dummy_inputs(model, 2, 8, seed=1)
    got, got_grads = _forward(model, inputs)
    reference.set_experts_implementation("eager")
    want, want_grads = _forward(reference, inputs)
    reference.zero_grad(set_to_none=True)
    reference.set_experts_implementation("grouped_mm")
    peer, peer_grads = _forward(reference, inputs)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    assert rel(got, want) <= max(1e-5, 2 * rel(peer, want))
    for name, grad in got_grads.items():
        assert name in want_grads, name
        assert rel(grad, want_grads[name]) <= max(
            1e-5, 2 * rel(peer_grads[name], want_grads[name])
        ), name
    experts = {n for n, _ in reference.named_parameters() if n not in got_grads}
    assert any(".experts." in n or "experts" in n for n in experts)  # the stacks: no gradient


def test_a_family_off_the_grouped_pass_and_a_dense_model_are_one_line():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dbrx = tiny_model("dbrx")
    with pytest.raises(ValueError, match="--quantize-experts: the experts of .* are not on moekit"):
        quantize_experts(dbrx, "nf4")
    dense = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match="has no MoE experts moekit runs"):
        quantize_experts(dense, "int8")
    with pytest.raises(ValueError, match="--quantize-experts must be one of nf4, int8"):
        quantize_experts(dense, "int4")


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    from chat_fixtures import save_chat_model

    return save_chat_model(tmp_path_factory.mktemp("qchat"))


def _args(chat, out, *extra):
    model, data = chat
    return [
        "finetune",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--seq-len",
        "128",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--lora-rank",
        "4",
        "--eval-interval",
        "4",
        "--no-track",
        "--no-progress",
        *extra,
    ]


def test_nf4_lora_finetune_learns_like_full_precision_and_resumes_bitwise(
    chat, tmp_path, monkeypatch
):
    """A LoRA fine-tune with nf4 experts lowers the held-out loss as the float32 one does
    (the gap printed); stopped at step 4 and resumed it ends bit for bit where the straight
    run ends; OUT/final is a plain adapter on the full-precision base. A quantised run on
    the CPU maps its large blocks on their own before it loads (`_memory`), a float32 one not."""
    import json

    from safetensors.torch import load_file

    import moekit.hf.finetune as finetune
    from moekit.cli import main

    runs, mapped = {}, []
    monkeypatch.setattr(finetune, "map_large_blocks", lambda: mapped.append(1) or True)
    for name, extra in (("fp32", ()), ("nf4", ("--quantize-experts", "nf4"))):
        mapped.clear()
        assert main([*_args(chat, tmp_path / name, *extra), "--steps", "8"]) == 0
        assert len(mapped) == (name == "nf4")
        state = json.loads((tmp_path / name / "ckpt-00000008" / "state.json").read_text())
        runs[name] = [e["val_loss"] for e in state["loop"]["evals"]]
    print("val loss fp32", runs["fp32"], "nf4", runs["nf4"])
    assert runs["nf4"][-1] < runs["nf4"][0] and runs["fp32"][-1] < runs["fp32"][0]
    drop = {k: v[0] - v[-1] for k, v in runs.items()}
    assert drop["nf4"] > 0.5 * drop["fp32"], drop
    half = tmp_path / "half"
    nf4 = ("--quantize-experts", "nf4")
    assert main([*_args(chat, half, *nf4), "--steps", "4"]) == 0
    assert main([*_args(chat, half, *nf4), "--steps", "8", "--resume"]) == 0
    a = load_file(tmp_path / "nf4" / "final" / "adapter_model.safetensors")
    b = load_file(half / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "nf4" / "final" / "adapter_config.json").read_text())
    assert config["target_parameters"]  # the plain PEFT adapter, base unquantised


def test_quantize_experts_with_a_full_finetune_is_one_line(chat, tmp_path, capsys):
    from moekit.cli import main

    args = _args(chat, tmp_path / "run")
    at = args.index("--lora-rank")
    args = args[:at] + args[at + 2 :]  # a full fine-tune
    assert main([*args, "--steps", "1", "--quantize-experts", "nf4"]) == 1
    assert "--quantize-experts needs --lora-rank" in capsys.readouterr().err
    assert main([*_args(chat, tmp_path / "run"), "--quantize-experts", "fp8"]) == 1
    assert "--quantize-experts must be one of nf4, int8" in capsys.readouterr().err


@pytest.mark.parametrize("loader", ["stream", "transformers"])
def test_quantising_as_the_model_loads_equals_quantising_after(tmp_path, monkeypatch, loader):
    """`load_model(quantize=...)`: each expert stack stored quantised as it is read, the
    parameter a one-element stand-in, by moekit's streaming reader (`hf.stream`, a few experts
    at a time) or, for checkpoints it does not map, inside transformers' loader (a stack at a
    time, checked against the files as it arrives): the same buffers, bit for bit, as a full
    load quantised after, verified against the files; then the stand-ins become meta."""
    from pathlib import Path

    from moekit.hf import load
    from moekit.hf.verify import VerifyReport, verify_experts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model("qwen3_moe").save_pretrained(tmp_path / "m")
    if loader == "transformers":
        monkeypatch.setattr(load, "_streamed", lambda *args: (None, "a test"))
    report = VerifyReport()
    streamed = load.load_model(Path(tmp_path / "m"), torch.float32, "nf4", report=report)
    verify_experts(streamed, tmp_path / "m", report)
    assert report.experts == 2 * 2 * 8 and not report.unverified  # 2 layers x 2 tensors x E
    for experts in _experts_modules(streamed):
        assert experts.gate_up_proj.untyped_storage().nbytes() <= 4  # one element, not E x
    monkeypatch.undo()
    after = load.load_model(Path(tmp_path / "m"), torch.float32)
    quantize_experts(after, "nf4")
    quantize_experts(streamed, "nf4")  # settles the stand-ins
    for ours, theirs in zip(_experts_modules(streamed), _experts_modules(after), strict=True):
        assert ours.gate_up_proj.is_meta and theirs.gate_up_proj.is_meta
        for name, buffer in theirs.named_buffers():
            assert torch.equal(ours.get_buffer(name), buffer), name
    inputs = dummy_inputs(after, 2, 8, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(streamed(**inputs).logits, after(**inputs).logits)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("shape", [(2, 8, 8), (3, 7, 5), (2, 64, 96)])
def test_triton_dequantisation_equals_torch(scheme, shape):
    """The CUDA kernels (`ops.triton_dequant`, run on CPU tensors under TRITON_INTERPRET=1)
    write each expert's values exactly as the torch path does."""
    import importlib
    import os

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 not set (a CUDA machine: tests/test_gpu.py runs them)")
    kernels = importlib.import_module("moekit.ops.triton_dequant")
    q = QuantizedExperts.quantize(
        torch.randn(shape, generator=torch.Generator().manual_seed(2)), scheme
    )
    for e in range(shape[0]):
        want = q.expert(e, torch.float32)  # torch (CPU tensors)
        if scheme == "int8":
            got = kernels.dequantize_int8(q.data[e], q.scales[e], torch.float32)
        else:
            n = shape[1] * shape[2]
            got = kernels.dequantize_nf4(q.data[e], q.scales[e], NF4_LEVELS, n, torch.float32)
            got = got.view(shape[1], shape[2])
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 32, 8), (3, 64, 5), (1, 96, 33)])  # (E, d_in, d_out)
def test_triton_mxfp4_dequantisation_equals_torch(shape):
    """gpt-oss's MXFP4 experts as stored (random codes, exponents over the whole range a
    checkpoint uses): the Triton kernel writes each expert's [d_in, d_out] weight exactly as
    the torch path does, in float32 and bfloat16."""
    import importlib
    import os

    from moekit.quant import FP4_VALUES, _mxfp4_expert

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 not set (a CUDA machine: tests/test_gpu.py runs them)")
    kernels = importlib.import_module("moekit.ops.triton_dequant")
    experts, d_in, d_out = shape
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (experts, d_out, d_in // 2), generator=g).to(torch.uint8)
    scales = torch.randint(100, 140, (experts, d_out, d_in // 32), generator=g).to(torch.uint8)
    for e in range(experts):
        for dtype in (torch.float32, torch.bfloat16):
            want = _mxfp4_expert(blocks[e], scales[e], dtype)
            got = kernels.dequantize_mxfp4(blocks[e], scales[e], FP4_VALUES, dtype)
            assert got.shape == (d_in, d_out)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_filled_an_expert_at_a_time_equals_quantising_the_stack(scheme):
    """`empty(...).fill(first, experts)` (a loader's reads, out of order) gives the bytes of
    `quantize`; a weight of another shape, or past the stack, is refused naming its expert."""
    w = torch.randn(3, 5, 70, generator=torch.Generator().manual_seed(0))  # 350: padded
    whole = QuantizedExperts.quantize(w, scheme)
    filled = QuantizedExperts.empty(scheme, (3, 5, 70), torch.float32)
    filled.fill(1, [w[1], w[2]])
    filled.fill(0, [w[0].double()])
    assert torch.equal(filled.data, whole.data) and torch.equal(filled.scales, whole.scales)
    with pytest.raises(ValueError, match=r"expert 2: expected a weight \[5, 70\], got \(70, 5\)"):
        filled.fill(2, [w[2].T])
    with pytest.raises(ValueError, match=r"expert 3: the stack holds experts 0\.\.2"):
        filled.fill(2, [w[2], w[0]])
