"""makeMoE checkpoints into moekit (`from_makemoe_state_dict`, `moekit import-makemoe`).

Oracle: makeMoE's own model (`moekit.bench.makemoe`, seed 003's code) with random weights; the
imported model's logits equal its logits in eval mode, float32. makeMoE draws routing noise in
eval mode too; the comparison switches that noise off (moekit routes without noise in eval).
"""

from __future__ import annotations

import pytest
import torch

from moekit.bench.makemoe import MakeMoELanguageModel
from moekit.cli import main
from moekit.lm import SparseMoELanguageModel, from_makemoe_state_dict
from moekit.lm.convert import load_makemoe, makemoe_config
from moekit.lm.inference import load_model

SHAPES = [  # vocab, block, n_embed, n_head, n_layer, experts, top_k
    (11, 8, 16, 4, 2, 4, 2),
    (13, 12, 24, 3, 1, 3, 3),
    (7, 5, 12, 1, 3, 1, 1),
    (65, 32, 32, 8, 2, 8, 2),
]


@pytest.fixture
def noiseless_makemoe(monkeypatch):
    """makeMoE's router adds randn * softplus(noise) in eval too: make the draw zero."""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)


def makemoe(v, bs, d, h, layers, e, k) -> MakeMoELanguageModel:
    return MakeMoELanguageModel(
        vocab_size=v, block_size=bs, n_embed=d, n_head=h, n_layer=layers, num_experts=e, top_k=k
    ).eval()


def assert_same_logits(ours: SparseMoELanguageModel, theirs: MakeMoELanguageModel) -> None:
    vocab, block = theirs.token_embedding_table.num_embeddings, theirs.block_size
    for batch, length in ((1, 1), (4, block), (3, max(1, block - 3))):
        idx = torch.randint(0, vocab, (batch, length))
        with torch.no_grad():
            want, got = theirs(idx)[0], ours(idx)[0]
        assert got.shape == want.shape == (batch, length, vocab)
        # relative to the logits' scale: the folded query scale rounds once per weight
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("shape", SHAPES)
def test_imported_logits_equal_makemoe(shape, noiseless_makemoe):
    theirs = makemoe(*shape)
    ours = from_makemoe_state_dict(theirs.state_dict(), top_k=shape[-1]).eval()
    v, bs, d, h, layers, e, k = shape
    cfg = ours.config
    assert (cfg.vocab_size, cfg.block_size, cfg.n_embed, cfg.n_head) == (v, bs, d, h)
    assert (cfg.n_layer, cfg.num_experts, cfg.top_k, cfg.router) == (layers, e, k, "noisy")
    assert_same_logits(ours, theirs)


def test_torch_save_load_round_trip(tmp_path, noiseless_makemoe):
    theirs = makemoe(*SHAPES[0])
    path = tmp_path / "makemoe.pt"
    torch.save(theirs.state_dict(), path)
    state_dict = torch.load(path, weights_only=True)
    assert_same_logits(from_makemoe_state_dict(state_dict).eval(), theirs)
    assert_same_logits(from_makemoe_state_dict(load_makemoe(path)).eval(), theirs)


def test_cli_import_then_generate_and_eval(tmp_path, capsys, noiseless_makemoe):
    text = "the quick brown fox jumps over the lazy dog\n" * 40
    data = tmp_path / "text.txt"
    data.write_text(text)
    vocab = len(set(text))
    theirs = makemoe(vocab, 8, 16, 2, 2, 4, 2)
    weights = tmp_path / "makemoe.pt"
    torch.save(theirs.state_dict(), weights)
    out = tmp_path / "imported"
    assert main(["import-makemoe", str(weights), "--data", str(data), "--out", str(out)]) == 0
    assert "checkpoint" in capsys.readouterr().out
    loaded = load_model(out)
    assert loaded.step == 0 and loaded.tokenizer.chars == "".join(sorted(set(text)))
    assert_same_logits(loaded.model, theirs)
    args = ["generate", "--checkpoint", str(out), "--prompt", "the ", "--max-new-tokens", "5"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("the ")
    assert main(["eval", "--checkpoint", str(out), "--eval-iters", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out
    # a text with other characters than the vocabulary the weights have
    other = tmp_path / "other.txt"
    other.write_text("abc" * 50)
    args = ["import-makemoe", str(weights), "--data", str(other), "--out", str(tmp_path / "o")]
    assert main(args) == 1
    assert "vocab_size=" in capsys.readouterr().err
    torch.save(theirs, tmp_path / "module.pt")  # a pickled module, not a state_dict
    args[1] = str(tmp_path / "module.pt")
    assert main(args) == 1
    assert "not a state_dict saved with torch.save" in capsys.readouterr().err


def _edited(change) -> dict:
    state_dict = dict(makemoe(*SHAPES[0]).state_dict())
    change(state_dict)
    return state_dict


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda sd: sd.pop("blocks.1.sa.heads.2.value.weight"),
            "'blocks.1.sa.heads.2.value.weight'",
        ),
        (lambda sd: sd.pop("lm_head.bias"), "missing key 'lm_head.bias'"),
        (lambda sd: sd.pop("blocks.0.smoe.experts.3.net.2.bias"), "experts.3.net.2.bias"),
        (
            lambda sd: sd.update({"blocks.0.smoe.router.noise_linear.weight": torch.zeros(3, 16)}),
            r"noise_linear.weight' has shape \(3, 16\), expected \(4, 16\)",
        ),
        (
            lambda sd: sd.update({"blocks.0.extra.weight": torch.zeros(1)}),
            "unexpected key 'blocks.0.extra",
        ),
        (
            lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("blocks.")],
            "missing key 'blocks.0.ln1.weight'",
        ),
        (lambda sd: sd.pop("token_embedding_table.weight"), "token_embedding_table.weight"),
    ],
)
def test_bad_state_dicts_name_the_key(change, match):
    with pytest.raises(ValueError, match=match):
        from_makemoe_state_dict(_edited(change))


def test_top_k_is_checked_and_the_tril_buffer_optional(noiseless_makemoe):
    theirs = makemoe(*SHAPES[0])
    with pytest.raises(ValueError, match="top_k=5 must be <= num_experts=4"):
        makemoe_config(theirs.state_dict(), top_k=5)
    without_masks = {k: v for k, v in theirs.state_dict().items() if not k.endswith(".tril")}
    assert_same_logits(from_makemoe_state_dict(without_masks).eval(), theirs)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        from_makemoe_state_dict([1, 2])
