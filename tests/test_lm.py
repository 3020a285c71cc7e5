"""The language model, its data and its configuration.

Oracles: makeMoE's parameter count; generation without the cache (re-encoding the window each
step, makeMoE's loop) for generation with it; round trips for tokenizers and configs.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from moekit import SparseMoELanguageModel
from moekit.lm import KVCache, LMConfig
from moekit.lm import data as lm_data
from moekit.lm.config import build_config
from moekit.lm.decode import decoder_for

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def tiny_model(**kw) -> SparseMoELanguageModel:
    args = dict(
        vocab_size=11, block_size=8, n_embed=16, n_head=2, n_layer=2, num_experts=4, top_k=2
    )
    return SparseMoELanguageModel(**(args | kw))


def test_default_model_has_makemoe_parameter_count():
    assert sum(p.numel() for p in SparseMoELanguageModel().parameters()) == 8_996_545


def test_forward_shapes_and_loss_is_plain_cross_entropy():
    model = tiny_model().eval()
    idx = torch.randint(0, 11, (3, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 8, 11)
    torch.testing.assert_close(
        loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 11), idx.reshape(-1))
    )
    assert model(idx)[1] is None
    assert model.aux_loss().dim() == 0 and float(model.aux_loss().detach()) > 0


@pytest.mark.parametrize("router", ["noisy", "softmax", "sigmoid", "switch"])
def test_kv_cache_logits_equal_full_forward(router):
    model = tiny_model(router=router, top_k=1 if router == "switch" else 2).eval()
    idx = torch.randint(0, 11, (2, 8))
    full, _ = model(idx)
    cache = KVCache(2, 8)
    steps = [model(idx[:, :3], cache=cache)[0]] + [
        model(idx[:, t : t + 1], cache=cache)[0] for t in range(3, 8)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [None, 3])
def test_generate_with_cache_equals_without_past_block_size(top_k):
    model = tiny_model()
    idx = torch.randint(0, 11, (2, 3))
    runs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(7)
        runs.append(
            model.generate(
                idx, 30, temperature=0.8, top_k=top_k, generator=gen, use_cache=use_cache
            )
        )
    assert runs[0].shape == (2, 33)  # grew well past block_size = 8
    assert torch.equal(runs[0], runs[1])
    assert model.training  # the mode is restored


def test_generate_is_reproducible_under_a_seed_and_crops_like_makemoe():
    model = tiny_model()
    idx = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(idx, 20, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # makeMoE's loop: logits of the last block_size tokens, sample, append
    model.eval()
    gen, seq = torch.Generator().manual_seed(1), idx
    for _ in range(20):
        logits, _ = model(seq[:, -8:])
        probs = torch.softmax(logits[:, -1].float(), dim=-1)
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=gen)], dim=1)
    assert torch.equal(seq, a)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m: m(torch.zeros(1, 9, dtype=torch.long)), ValueError, "block_size=8"),
        (lambda m: m(torch.full((1, 4), 11)), ValueError, r"vocab_size=11"),
        (lambda m: m(torch.zeros(1, 4)), TypeError, "idx must be an integer tensor"),
        (
            lambda m: m(torch.zeros(4, dtype=torch.long)),
            ValueError,
            r"idx must have shape \[B, T\]",
        ),
        (
            lambda m: m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)),
            ValueError,
            "targets shape",
        ),
        (
            lambda m: m.generate(torch.zeros(1, 1, dtype=torch.long), 3, temperature=0),
            ValueError,
            "temperature",
        ),
        (
            lambda m: m.generate(torch.zeros(1, 1, dtype=torch.long), 3, top_k=12),
            ValueError,
            "top_k=12",
        ),
    ],
)
def test_model_input_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(tiny_model())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_embed": 30, "n_head": 4}, "divisible"),
        ({"router": "x"}, "router"),
        ({"top_k": 9}, "top_k=9"),
        ({"dropout": 1.0}, "dropout"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
    ],
)
def test_lm_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LMConfig(**kwargs)


def test_char_tokenizer_round_trip():
    tok = lm_data.CharTokenizer.train("hello world")
    assert tok.decode(tok.encode("world hello")) == "world hello"
    assert lm_data.tokenizer_from_dict(tok.to_dict()).encode("lo") == tok.encode("lo")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("z")


def test_bpe_tokenizer_trains_offline_and_round_trips():
    text = CORPUS.read_text()[:20000]
    tok = lm_data.BPETokenizer.train(text, vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    sample = "To be, or not to be: that is the question. ¿Qué?"
    assert tok.decode(tok.encode(sample)) == sample  # byte-level: any text
    again = lm_data.tokenizer_from_dict(tok.to_dict())
    assert again.encode(sample) == tok.encode(sample)


def test_token_data_split_and_batches():
    data = lm_data.TokenData.from_ids(list(range(100)), block_size=4)
    assert len(data.train) == 90 and len(data.val) == 10
    x, y = data.batch("val", 5, 4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 4)
    assert torch.equal(y[:, :-1], x[:, 1:]) and int(x.min()) >= 90
    with pytest.raises(ValueError, match="too short"):
        lm_data.TokenData.from_ids(list(range(20)), block_size=4)


def test_load_text_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--data .*no such file"):
        lm_data.load_text(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="--data .*not UTF-8"):
        lm_data.load_text(bad)


def test_tinyshakespeare_offline_without_cache_names_data(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(lm_data.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="--data PATH"):
        lm_data.tinyshakespeare(tmp_path)
    # a verified cached copy needs no network
    (tmp_path / "tinyshakespeare.txt").write_bytes(CORPUS.read_bytes())
    assert lm_data.tinyshakespeare(tmp_path) == tmp_path / "tinyshakespeare.txt"
    # a cached copy that fails the hash is not trusted
    (tmp_path / "tinyshakespeare.txt").write_text("tampered")
    with pytest.raises(RuntimeError, match="--data PATH"):
        lm_data.tinyshakespeare(tmp_path)


def test_build_config_layers_preset_toml_and_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'max_iters = 7\nlearning_rate = 0.002\n[model]\nn_layer = 3\nrouter = "sigmoid"\n'
    )
    cfg = build_config("tiny", str(toml), learning_rate=0.005, top_k=1)
    assert cfg.steps == 7 and cfg.lr == 0.005
    assert cfg.model.n_layer == 3 and cfg.model.router == "sigmoid" and cfg.model.top_k == 1
    assert cfg.model.n_embed == 32  # from the preset
    with pytest.raises(ValueError, match="unknown configuration keys"):
        build_config("tiny", None, max_iter=3)
    with pytest.raises(ValueError, match="preset"):
        build_config("huge")
    with pytest.raises(ValueError, match="schedule"):
        build_config("tiny", None, schedule="step")


def test_makemoe_preset_keeps_the_blogs_hyperparameters():

    cfg = build_config("makemoe")
    assert (cfg.batch_size, cfg.model.block_size, cfg.lr) == (16, 32, 1e-3)
    assert (cfg.steps, cfg.eval_interval, cfg.eval_batches) == (5000, 500, 100)
    exact = build_config(
        "makemoe",
        None,
        init="kaiming",
        dropout=0.1,
        schedule="constant",
        warmup_iters=0,
        eval_interval=100,
        eval_iters=400,
    )
    assert exact.model == LMConfig(init="kaiming", dropout=0.1)
    assert (exact.eval_interval, exact.eval_batches, exact.schedule) == (100, 400, "constant")


def test_stream_yields_generates_tokens_one_at_a_time_without_leaking_modes():
    model = tiny_model()
    idx = torch.randint(0, 11, (2, 3))
    want = model.generate(idx, 12, top_k=5, generator=torch.Generator().manual_seed(3))
    stream = model.stream(idx, 12, top_k=5, generator=torch.Generator().manual_seed(3))
    got = []
    for token in stream:
        assert token.shape == (2, 1)
        assert torch.is_grad_enabled() and not model.training  # eval while the stream is open
        got.append(token)
    assert torch.equal(torch.cat([idx, *got], dim=1), want)
    assert model.training
    early = model.stream(idx, 12)
    next(early)
    early.close()  # a stream left early restores the mode too
    assert model.training
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.stream(idx, -1)  # checked when the stream is made, not when first read


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_generate_text_streams_the_text_it_returns(kind):
    from moekit.lm.inference import Loaded, generate_text

    text = CORPUS.read_text()[:20000]
    tok = lm_data.build_tokenizer(kind, text, 300)
    model = tiny_model(vocab_size=tok.vocab_size)
    prompt = "ROMEO: é" if kind == "bpe" else "ROMEO:"  # byte-level BPE: a 2-byte character
    pieces = []
    out = generate_text(Loaded(model, tok, {}, 0), prompt, 40, seed=2, on_text=pieces.append)
    assert "".join(pieces) == out and pieces[0] == prompt and len(pieces) > 10
    assert generate_text(Loaded(model, tok, {}, 0), prompt, 40, seed=2) == out


def test_decoding_computes_the_last_position_alone_and_equals_the_full_forward():
    model = tiny_model().eval()
    idx = torch.randint(0, 11, (3, 8))
    full, _ = model(idx)  # [3, 8, V]
    torch.testing.assert_close(model._logits(idx, None), full[:, -1], atol=1e-5, rtol=1e-5)
    cache = KVCache(model.config.n_layer, 8)
    got = [model._logits(idx[:, :5], cache)]
    got += [model._logits(idx[:, t : t + 1], cache) for t in range(5, 8)]
    want = full[:, 4:]
    torch.testing.assert_close(torch.stack(got, dim=1), want, atol=1e-5, rtol=1e-5)
    assert all(layer.aux_losses == {} for layer in model.moe_layers())  # decoding skips them


def test_kv_cache_writes_in_place_and_refuses_overflow():
    cache = KVCache(1, 4)
    k = torch.randn(2, 3, 3, 5)
    keys, _ = cache.extend(0, k, k)
    buffer = cache.keys[0]
    keys, values = cache.extend(0, k[:, :, :1], k[:, :, :1])
    assert cache.keys[0] is buffer and keys.shape == (2, 3, 4, 5) and cache.length == 4
    torch.testing.assert_close(keys[:, :, :3], k)
    with pytest.raises(ValueError, match="max_length=4"):
        cache.extend(0, k[:, :, :1], k[:, :, :1])
    cache.reset()
    assert cache.length == 0 and cache.extend(0, k, k)[0].shape[2] == 3


@pytest.mark.parametrize("prompt", [1, 5, 8])
def test_fixed_shape_decoding_draws_the_same_tokens(prompt):
    """The static path (device-side position, whole-buffer attention, [B, block] windows: what
    CUDA replays as graphs) samples exactly what the dynamic path samples."""
    model = tiny_model().eval()
    idx = torch.randint(0, 11, (3, prompt))
    runs = []
    for static in (False, True):
        gen = torch.Generator().manual_seed(5)
        steps = model._draw(idx, 20, 1.0, None, gen, True, static=static)
        runs.append(torch.cat(list(steps), dim=1))
    assert runs[0].shape == (3, 20)
    assert torch.equal(runs[0], runs[1])


def test_a_kept_static_decoder_starts_over_at_each_call():
    """The static decoder (and on CUDA its graphs) is kept across calls: a second and third
    sequence of other prompt lengths draw what fresh dynamic decoding draws."""
    model = tiny_model().eval()
    for prompt in (5, 1, 8):
        idx = torch.randint(0, 11, (2, prompt))
        runs = []
        for static in (True, False):
            gen = torch.Generator().manual_seed(prompt)
            runs.append(torch.cat(list(model._draw(idx, 12, 1.0, None, gen, True, static)), 1))
        assert torch.equal(runs[0], runs[1])
    assert decoder_for(model, 2, True, True) is decoder_for(model, 2, True, True)
    assert decoder_for(model, 3, True, True) is not decoder_for(model, 2, True, True)


def test_kv_cache_write_at_a_device_position_equals_extend():
    model = tiny_model().eval()
    idx = torch.randint(0, 11, (2, 6))
    dynamic = KVCache(model.config.n_layer, 8)
    static = KVCache(model.config.n_layer, 8)
    model._logits(idx[:, :5], dynamic)
    model._logits(idx[:, :5], static)
    want = model._logits(idx[:, 5:], dynamic)
    for buffer in (*static.keys, *static.values):
        buffer[:, :, 6:] = 1e30  # stale values past the position must not leak in
    got = model._logits(idx[:, 5:], static, torch.tensor([5]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert static.length == 5  # the fixed-shape step leaves the host-side count alone


def test_lm_routing_options_reach_every_layer_and_train():
    """DeepSeek-style layers from the config: group-limited sigmoid routing, a scaling factor,
    gated shared experts; old checkpoints' configs (without these fields) still load."""
    config = LMConfig(
        vocab_size=11,
        block_size=8,
        n_embed=16,
        n_head=2,
        n_layer=2,
        num_experts=8,
        router="sigmoid",
        num_groups=4,
        top_k_groups=2,
        scaling_factor=2.5,
        num_shared_experts=2,
        shared_gate=True,
    )
    model = SparseMoELanguageModel.from_config(config)
    for block in model.blocks:
        router = block.moe.router
        assert (router.num_groups, router.top_k_groups, router.scaling_factor) == (4, 2, 2.5)
        shared = block.moe.shared_experts
        assert shared.gate is not None and shared.mlp.fc2.in_features == 2 * 4 * 16
    idx = torch.randint(0, 11, (3, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.blocks[0].moe.shared_experts.gate.weight.grad is not None
    noisy = SparseMoELanguageModel.from_config(
        LMConfig(**{**config.to_dict(), "router": "noisy", "num_groups": 1, "top_k_groups": None})
    )
    assert noisy.blocks[0].moe.router.scaling_factor == 2.5
    old = {k: v for k, v in LMConfig().to_dict().items() if k not in ("num_groups", "shared_gate")}
    assert LMConfig.from_dict(old) == LMConfig()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_groups=2), "num_groups and top_k_groups need router='sigmoid'"),
        (dict(router="sigmoid", num_groups=3), "num_groups=3 must divide num_experts=8"),
        (dict(router="switch", top_k=1, scaling_factor=2.0), "scaling_factor needs router"),
        (dict(shared_gate=True), "num_shared_experts=0 must be >= 0, and >= 1 with shared_gate"),
        (dict(num_shared_experts=-1), "num_shared_experts=-1"),
    ],
)
def test_lm_routing_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseMoELanguageModel.from_config(LMConfig(**kwargs))
