"""PEFT LoRA on the stacked experts (`LoraConfig(target_parameters=[...])`) of a model on
moekit's experts backend (`experts_implementation="moekit"`), with no `patch_model`: alone and
under TRL's `SFTTrainer`.

Oracle: the same PEFT model with transformers' `"eager"` experts (PEFT's own W + delta):
logits, loss and every LoRA gradient (experts and attention) in float32 (Qwen3-MoE; gpt-oss's
transposed, biased and Nemotron-H's ungated experts too), and TRL's losses step by step. `moekit.hf.lora_path_calls` proves moekit's grouped pass computed the experts'
low-rank terms, and stays put where PEFT forms W + delta itself (several active adapters) or
adds no delta (adapters disabled or merged).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from moekit.hf import lora_path_calls, tiny_config, tiny_model  # noqa: E402
from moekit.hf.catalog import dummy_inputs  # noqa: E402

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = ["q_proj", "v_proj"]


def _model(implementation: str, seed: int = 0) -> nn.Module:
    """A tiny two-layer Qwen3-MoE (8 experts, top-2, d=32) on `implementation`, its expert
    weights at unit scale (N(0, 0.2)) so that the experts' outputs and gradients matter."""
    config = tiny_config(transformers.Qwen3MoeConfig)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, experts_implementation=implementation
    )
    with torch.no_grad():
        for layer in model.model.layers:
            for param in layer.mlp.experts.parameters():
                param.normal_(0.0, 0.2)
    return model


def _adapted(model: nn.Module, **options) -> nn.Module:
    """PEFT LoRA (r=4, both factors random so every gradient is nonzero) on the experts'
    stacked weights and the attention's q and v projections."""
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=4,
        target_parameters=EXPERTS,
        target_modules=ATTENTION,
        init_lora_weights=False,
        **options,
    )
    return peft.get_peft_model(model, config)


def _step(model: nn.Module, inputs: dict):
    """Logits, loss and the gradient of every LoRA tensor after one forward and backward."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return out.logits.detach(), out.loss.detach(), grads


def _switched(model: nn.Module, implementation: str) -> nn.Module:
    """A copy of a PEFT model whose transformers model runs `implementation`'s experts."""
    other = copy.deepcopy(model)
    other.get_base_model().set_experts_implementation(implementation)
    return other


def test_peft_expert_lora_runs_in_moekit_s_grouped_pass(monkeypatch):
    """LoRA on the experts' stacked weights and the attention, in training mode: logits, loss
    and all 16 LoRA gradients equal eager's, computed from W and PEFT's factors."""
    from peft.tuners.lora.layer import _LoraFactorsProxy

    model = _adapted(_model("moekit")).train()
    eager = _switched(model, "eager")
    inputs = dummy_inputs(model, 2, 8, seed=1)
    built = []  # PEFT's W + scaling * lhs @ rhs, each time it is formed
    proxy_forward = _LoraFactorsProxy.forward
    monkeypatch.setattr(
        _LoraFactorsProxy, "forward", lambda self, w: built.append(1) or proxy_forward(self, w)
    )

    want, want_loss, want_grads = _step(eager, inputs)
    eager_built, built[:] = len(built), []
    assert lora_path_calls(model) == 0
    got, got_loss, got_grads = _step(model, inputs)

    assert lora_path_calls(model) == 2  # each layer's experts, once
    # the backend never reads W + delta: PEFT forms it only in torch's check as it registers
    # the parametrization (once a wrapper: 2 layers x 2 weights), eager again as it reads it
    assert len(built) == 4 and eager_built == 8
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_loss, want_loss)
    assert len(want_grads) == 16 and got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got_grads[name], grad, msg=name)


LAYOUTS = {  # transposed [E, d_in, d_out] with biases; ungated (up_proj alone)
    "gpt_oss": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "nemotron_h": ["mixer.experts.up_proj", "mixer.experts.down_proj"],
}


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_peft_expert_lora_on_the_backend_in_other_layouts(family):
    """PEFT's factors come in each weight's own layout: the backend adds them right on
    transposed and ungated experts too (output and every LoRA gradient vs eager, one shared
    upstream gradient)."""
    base = tiny_model(family).train()
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, target_parameters=LAYOUTS[family], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    model.get_base_model().set_experts_implementation("moekit")
    eager = _switched(model, "eager")
    inputs = dummy_inputs(base, 2, 8, seed=1)
    results = []
    for each in (model, eager):
        logits = each(**inputs).logits
        upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
        (logits * upstream).sum().backward()
        grads = {n: p.grad for n, p in each.named_parameters() if "lora_" in n}
        results.append((logits.detach(), grads))
    (got, got_grads), (want, want_grads) = results
    assert lora_path_calls(model) >= 1 and lora_path_calls(eager) == 0
    torch.testing.assert_close(got, want)
    assert want_grads and got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got_grads[name], grad, msg=name)


def _two_adapters(model: nn.Module) -> None:
    torch.manual_seed(2)
    config = peft.LoraConfig(
        r=2, target_parameters=EXPERTS, target_modules=ATTENTION, init_lora_weights=False
    )
    model.add_adapter("other", config)
    model.base_model.set_adapter(["default", "other"])


FALLBACKS = {
    "two active adapters": _two_adapters,  # PEFT sums both deltas into W
    "adapters disabled": lambda model: model.base_model.disable_adapter_layers(),
    "adapters merged": lambda model: model.merge_adapter(),
}


@pytest.mark.parametrize("state", list(FALLBACKS))
def test_where_peft_forms_the_weights_the_backend_runs_them(state):
    """Where PEFT forms W + delta itself (or adds none) the backend computes on the weights
    PEFT gives it: the logits are eager's and the counter stays put."""
    model = _adapted(_model("moekit")).eval()
    FALLBACKS[state](model)
    eager = _switched(model, "eager")
    inputs = dummy_inputs(model, 2, 8, seed=1)
    with torch.no_grad():
        want, got = eager(**inputs).logits, model(**inputs).logits
    torch.testing.assert_close(got, want)
    assert lora_path_calls(model) == 0


def test_peft_refuses_dropout_on_expert_lora():
    """No dropout case to fall back from: PEFT's `ParamWrapper` refuses `lora_dropout`."""
    with pytest.raises(ValueError, match="lora_dropout"):
        _adapted(_model("moekit"), lora_dropout=0.1)


def test_lora_path_calls_takes_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lora_path_calls("model")


TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang a song",
    "fish swim in the sea",
    "the sun is warm today",
    "rain falls on the roof",
    "a cat and a dog play",
    "the park is green",
]


def _tokenizer():
    """A word-level tokenizer over `TEXTS` built offline, with pad and eos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({word for text in TEXTS for word in text.split()})
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _sft(implementation: str, tmp_path):
    """Three SFTTrainer steps with expert and attention LoRA, TRL's defaults (gradient
    checkpointing on) but float32 (TRL trains under bf16 autocast by default, CPU too, where
    moekit and eager round differently): the losses, the expert LoRA tensors before and
    after, the trained model."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")

    model = _model(implementation)
    config = trl.SFTConfig(
        output_dir=str(tmp_path / implementation),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
        processing_class=_tokenizer(),
        peft_config=peft.LoraConfig(r=4, target_parameters=EXPERTS, target_modules=ATTENTION),
    )
    experts_lora = {
        n: p.detach().clone()
        for n, p in trainer.model.named_parameters()
        if "lora_" in n and ".experts" in n
    }
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    after = {n: p.detach() for n, p in trainer.model.named_parameters() if n in experts_lora}
    return losses, experts_lora, after, trainer.model


def test_trl_sft_trainer_runs_expert_lora_on_the_backend(tmp_path):
    losses, before, after, model = _sft("moekit", tmp_path)
    want, _, _, eager = _sft("eager", tmp_path)
    assert model.get_base_model().config._experts_implementation == "moekit"
    # 3 steps x 2 layers x (the forward, and gradient checkpointing's recompute in backward)
    assert lora_path_calls(model) == 12 and lora_path_calls(eager) == 0
    assert len(losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want))
    assert len(before) == 8  # lora_A and lora_B of 2 weights x 2 layers
    for name, tensor in before.items():
        assert not torch.equal(after[name], tensor), name
