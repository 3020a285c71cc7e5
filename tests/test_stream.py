"""Streaming and sharded loading (`hf.stream`): a model read tensor by tensor from its files
equals transformers' own load for every family it maps (the others say why and fall back);
each expert-parallel rank reads only its experts, equal to the same rows of the full load at
EP 1, 2 and 4 (in full precision and quantised), the model's logits equal one process's; a
fault injected into one rank's reader (rank 0's rows on rank 1, a slice shifted by one, a
transposed expert) is caught by the verification with its layer, tensor and expert."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import load_workers  # noqa: E402
from moekit.hf.catalog import TinyModelError, dummy_inputs, moe_families, tiny_model  # noqa: E402
from moekit.hf.load import load_config, load_model  # noqa: E402
from moekit.hf.stream import SHARD, checkpoint_map, stream_model  # noqa: E402
from moekit.quant import QuantizedExperts  # noqa: E402
from spawn import run_ranks  # noqa: E402


def _causal_families() -> list[str]:
    return [f.name for f in moe_families()]


def _saved(root: Path, family: str, **sizes) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(family, **sizes)
        model.save_pretrained(root / family)
    return root / family


@pytest.mark.parametrize("family", _causal_families())
def test_streamed_equals_transformers_load(family):
    """Every tensor equal, bit for bit, to `from_pretrained`'s (renamed and per-expert
    checkpoints included); a family whose conversions the reader does not perform says which
    (`load_model` then uses transformers' loader)."""
    import transformers

    try:
        model = tiny_model(family)
    except TinyModelError as error:
        pytest.skip(str(error))
    if "ForCausalLM" not in type(model).__name__:
        pytest.skip(f"{type(model).__name__}: not a causal LM (moekit finetune's models)")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model.save_pretrained(tmp)
            want = transformers.AutoModelForCausalLM.from_pretrained(tmp)
        except Exception as error:  # noqa: BLE001 - transformers' own round trip fails
            pytest.skip(f"transformers cannot reload its own save: {error!r:.120}")
        got, why = stream_model(Path(tmp), load_config(Path(tmp)), torch.float32)
        if got is None:
            assert why and isinstance(checkpoint_map(want, Path(tmp)), str)
            return
        a, b = want.state_dict(), got.state_dict()
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
        assert not any(p.is_meta for p in got.parameters())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    return {
        "qwen3_moe": _saved(root, "qwen3_moe", vocab_size=64),
        "mixtral": _saved(root, "mixtral", vocab_size=64),  # renamed, w1 / w3 / w2
        "gpt_oss": _saved(root, "gpt_oss", vocab_size=64),  # fused [E, d, 2h] with biases
        "square": _saved(root / "sq", "qwen3_moe", vocab_size=64, d_model=32, d_hidden=16),
    }


def _full_rows(model_dir: Path, quantize: str | None) -> tuple[dict, torch.Tensor]:
    model = load_model(model_dir, torch.float32, quantize)
    rows = {}
    for name, module in model.named_modules():
        if SHARD in module.__dict__:
            for attr, t in [*module._parameters.items(), *module._buffers.items()]:
                if attr.endswith("_qscales"):
                    continue
                if quantize is None or attr.endswith("_qdata") or attr.endswith("_bias"):
                    rows[f"{name}.{attr}"] = t.detach()
    ids = torch.arange(2 * 12).remainder(model.config.vocab_size).view(2, 12)
    with torch.no_grad():
        return rows, model(input_ids=ids).logits


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_sharded_loading_equals_full_loading(models, family, quantize):
    """EP 1 (one process), 2 and 4: rank r's rows are rows [r E/R, (r+1) E/R) of the full
    load (the quantised bytes too), verified on each rank, and the expert-parallel logits
    equal one process's."""
    full, logits = _full_rows(models[family], quantize)
    for world in (2, 4):
        results = run_ranks(load_workers.sharded_load, world, str(models[family]), quantize, None)
        for rank, result in enumerate(results):
            experts = 8 // world  # of each of the 4 stacked weights (2 layers, up and down)
            assert result["verified"].startswith(f"{4 * experts} expert slices of 4 tensors")
            torch.testing.assert_close(result["logits"], logits, rtol=1e-5, atol=1e-6)
            for name, rows in result["rows"].items():
                module = name.rsplit(".", 1)[0]
                first = result["first"][module]
                assert first == rank * rows.shape[0]
                assert torch.equal(rows, full[name][first : first + rows.shape[0]]), name


@pytest.mark.distributed
@pytest.mark.parametrize(
    "fault,match",
    [
        # rank 1 of 2 reads rank 0's experts 0..3 for its 4..7
        ({"rank": 1, "shift": -4}, r"expert 4: .*\(expert 0's rows of the file;"),
        # rank 0's slice one expert off: its expert 0 holds expert 1's rows
        ({"rank": 0, "shift": 1}, r"expert 0: .*\(expert 1's rows of the file;"),
        # a square gate_up [2h, d] read transposed keeps its shape
        ({"rank": 1, "transpose": True}, r"gate_up_proj, expert 4: .*\(transposed;"),
    ],
)
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_a_fault_in_one_ranks_reader_is_named(models, fault, match, quantize):
    results = run_ranks(load_workers.sharded_load, 2, str(models["square"]), quantize, fault)
    caught = results[fault["rank"]]
    assert "fault" in caught, caught
    assert caught["fault"].startswith("model.layers.0.mlp: ")
    import re

    assert re.search(match, caught["fault"]), caught["fault"]
    other = results[1 - fault["rank"]]
    assert "fault" not in other and other["verified"].startswith("16 expert slices")  # 4 of 8, x 4


def test_streaming_quantises_an_expert_at_a_time(models, monkeypatch):
    """The reader quantises each expert as it reads it (`QuantizedExperts.fill`): never a
    stack in the compute dtype; the bytes equal quantising the full stack."""
    from moekit.hf import stream

    shapes = []
    fill = QuantizedExperts.fill

    def spy(self, first, weights):
        def seen():
            for w in weights:
                shapes.append(tuple(w.shape))
                yield w

        return fill(self, first, seen())

    monkeypatch.setattr(stream.QuantizedExperts, "fill", spy)
    model_dir = models["qwen3_moe"]
    got, _ = stream_model(model_dir, load_config(model_dir), torch.float32, "nf4")
    monkeypatch.undo()
    assert shapes and all(len(shape) == 2 for shape in shapes)  # one expert [d_in, d_out]
    quantize = QuantizedExperts.quantize
    want = load_model(model_dir, torch.float32)
    for a, b in zip(got.model.layers, want.model.layers, strict=True):
        bank = b.mlp.experts.gate_up_proj.detach().transpose(1, 2)
        assert torch.equal(a.mlp.experts.gate_up_proj_qdata, quantize(bank, "nf4").data)
    inputs = dummy_inputs(want, 1, 4)
    assert got(**inputs).logits.isfinite().all()


def _mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference MXFP4 quantiser: `weight` [E, d_out, d_in] -> transformers' `*_blocks`
    [E, d_out, d_in / 32, 16] (two E2M1 codes a byte, the low nibble first) and `*_scales`
    [E, d_out, d_in / 32] (a power of two a block, E8M0, bias 127)."""
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    experts, d_out, d_in = weight.shape
    blocks = weight.reshape(experts, d_out, d_in // 32, 32)
    absmax = blocks.abs().amax(-1).clamp_min(1e-30)
    exponent = torch.ceil(torch.log2(absmax / 6.0)).clamp(-127, 127)  # absmax / 2^k <= 6
    scaled = blocks / torch.exp2(exponent)[..., None]
    code = (scaled.abs()[..., None] - values).abs().argmin(-1)  # nearest magnitude
    code = code | ((scaled < 0).long() << 3)  # the sign bit
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exponent + 127).to(torch.uint8)


@pytest.mark.parametrize("ranks", [2, 3])
def test_fsdp2_ranks_read_only_their_rows_of_the_dense_weights(models, monkeypatch, ranks):
    """`dense_shard`: each rank reads only the rows FSDP2 keeps of every weight outside the
    experts (chunks of ceil(n / ranks) of dim 0, as `fully_shard` cuts them), and those rows
    equal the full load's; the experts are read whole (or as their EP shard)."""
    from moekit.hf import stream

    model_dir = models["qwen3_moe"]
    want = dict(load_model(model_dir, torch.float32).named_parameters())
    for rank in range(ranks):
        reads = []
        read = stream.CheckpointMap._read

        def spy(self, key, part=None, reads=reads, read=read):
            reads.append((key, part))
            return read(self, key, part)

        monkeypatch.setattr(stream.CheckpointMap, "_read", spy)
        got, _ = stream_model(
            model_dir, load_config(model_dir), torch.float32, dense_shard=(rank, ranks)
        )
        monkeypatch.undo()
        dense = {n: p for n, p in got.named_parameters() if ".experts." not in n}
        assert dense and any(p.dim() == 2 for p in dense.values())
        for name, param in dense.items():
            if param.dim() == 0:
                continue
            rows = -(-param.shape[0] // ranks)
            first, last = min(rank * rows, param.shape[0]), min((rank + 1) * rows, param.shape[0])
            assert torch.equal(param[first:last], want[name][first:last]), name
        params = dict(got.named_parameters())
        whole = [k for k, part in reads if part is None and k in params and params[k].dim()]
        assert not whole, whole  # no dense weight read whole
        sliced = {key: part for key, part in reads if isinstance(part, slice)}
        assert sliced.keys() == {n for n, p in dense.items() if p.dim()}
        for key, part in sliced.items():
            assert part.stop - part.start <= -(-params[key].shape[0] // ranks), key


def test_gpt_oss_mxfp4_loads_as_stored(tmp_path):
    """A gpt-oss checkpoint whose experts are MXFP4 in transformers' layout (`*_blocks`,
    `*_scales`, built here): the codes and exponents are held as stored (the stack never
    dequantised: the weights are stand-ins), each rank's rows verified by their digests, and
    the logits equal transformers' eager experts holding the weights transformers' own
    `convert_moe_packed_tensors` dequantises."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moekit.hf.finetune import FinetuneConfig, FinetuneJob
    from moekit.hf.verify import verify_experts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model("gpt_oss", vocab_size=256, d_model=64, d_hidden=64)
        model.save_pretrained(tmp_path / "plain")
    state = load_file(tmp_path / "plain" / "model.safetensors")
    reference = dict(state)
    for name in [n for n in state if n.endswith(("gate_up_proj", "down_proj"))]:
        weight = state.pop(name)  # [E, d_in, d_out] (gpt-oss keeps its experts transposed)
        blocks, scales = _mxfp4(weight.transpose(1, 2))
        state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
        reference[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    (tmp_path / "mx").mkdir()
    save_file(state, tmp_path / "mx" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "mx" / "config.json").write_text(json.dumps(config))

    got = load_model(tmp_path / "mx", torch.float32)
    experts = got.model.layers[0].mlp.experts
    assert torch.equal(
        experts.gate_up_proj_qdata[0],
        state["model.layers.0.mlp.experts.gate_up_proj_blocks"][0].flatten(1),
    )
    assert experts.gate_up_proj.untyped_storage().nbytes() <= 4  # a stand-in, no stack
    assert verify_experts(got, tmp_path / "mx").experts == 2 * 2 * 8  # 2 layers x 2 x E
    model.load_state_dict(reference)
    model.set_experts_implementation("eager")
    inputs = dummy_inputs(model, 2, 8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(got(**inputs).logits, model(**inputs).logits)
    # a LoRA fine-tune trains on them; a full fine-tune of a quantised base is one line
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    base = dict(model=str(tmp_path / "mx"), data=str(data), seq_len=16, batch_size=2)
    base |= dict(steps=1, track=False, progress=False)
    job = FinetuneJob(FinetuneConfig(out=str(tmp_path / "lora"), lora_rank=2, **base))
    from moekit.hf.patch import experts_of
    from moekit.train.loop import Loop

    block = job.model.get_base_model().model.layers[0].mlp
    assert experts_of(block).gate_up_proj.is_meta  # no stack, now nor after the step
    loop = Loop(job)
    loop.train_step()
    assert experts_of(block).gate_up_proj.is_meta
    with pytest.raises(
        ValueError, match="experts are stored in mxfp4; fine-tune them with --lora-rank"
    ):
        FinetuneJob(FinetuneConfig(out=str(tmp_path / "full"), **base))
    # --merge: the adapter merged into the dequantised base, a plain full-precision model
    merged_job = FinetuneJob(
        FinetuneConfig(out=str(tmp_path / "merge"), lora_rank=2, merge=True, **base)
    )
    Loop(merged_job).run()
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merge" / "merged")
        want = PeftModel.from_pretrained(model, str(tmp_path / "merge" / "final"))
        want = want.merge_and_unload()
    assert "quantization_config" not in merged.config.to_dict()
    merged.set_experts_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, want(**inputs).logits)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("ranks", [2, 4])
def test_ep_rank_lora_factors_are_cut_as_peft_makes_them(models, monkeypatch, family, ranks):
    """On a rank that read its experts only, `add_lora` never holds the whole model's expert
    factors: each ParamWrapper's are cut to the rank's experts as PEFT makes them (at most one
    wrapper's whole factors at a time), and they equal the one-process adapter's rows
    (lora_A [r E, in] expert-major, lora_B [out, r E] expert-minor: the same RNG draws)."""
    from moekit.hf import parallel
    from moekit.hf.lora import add_lora

    model_dir = models[family]
    torch.manual_seed(3)
    one = add_lora(load_model(model_dir, torch.float32), 2, None, ("experts",))
    want = {n: p.detach() for n, p in one.named_parameters() if "lora_" in n}
    r = 2
    for rank in range(ranks):
        made = []  # the wrappers cut so far, in the order PEFT made them
        cut = parallel._shard_adapter

        def spy(wrapper, first, local, cut=cut, made=made):
            assert wrapper.num_experts == local * ranks  # whole: this one only
            assert all(w.num_experts == local for w in made)  # the earlier ones cut already
            cut(wrapper, first, local)
            made.append(wrapper)

        monkeypatch.setattr(parallel, "_shard_adapter", spy)
        torch.manual_seed(3)
        model = load_model(model_dir, torch.float32, shard=(rank, ranks))
        got = add_lora(model, 2, None, ("experts",))
        monkeypatch.undo()
        wrappers = parallel._adapter_wrappers(got)
        assert wrappers and {id(w) for w, _ in wrappers} == {id(w) for w in made}
        for name, param in got.named_parameters():
            if "lora_" not in name:
                continue
            full = want[name]
            if "lora_A" in name:  # [r e, in]
                e = full.shape[0] // r // ranks
                assert torch.equal(param, full[rank * e * r : (rank + 1) * e * r]), name
            else:  # [out, r e]
                e = full.shape[1] // r // ranks
                cols = full.view(full.shape[0], r, -1)[:, :, rank * e : (rank + 1) * e]
                assert torch.equal(param, cols.reshape(full.shape[0], r * e)), name
