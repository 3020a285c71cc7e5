"""Supervised fine-tuning on chat records through `moekit finetune`'s job: the attention of
packed rows is block-diagonal (for the implementation in use), packed and padded rows give the
same held-out loss, and a step is the same update at any gradient accumulation (float64),
including a micro-batch with no supervised token."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from chat_fixtures import save_chat_model  # noqa: E402
from moekit.train.finetune_config import FinetuneConfig  # noqa: E402


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("chat"))


def _job(chat, out, **changes):
    from moekit.hf.finetune import FinetuneJob

    model, data = chat
    options = dict(
        model=str(model),
        data=str(data),
        out=str(out),
        steps=1,
        seq_len=128,
        batch_size=4,
        lr=1e-2,
        track=False,
        progress=False,
        grad_clip=0.0,
    )
    return FinetuneJob(FinetuneConfig(**(options | changes)))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_documents_attend_to_themselves_only(chat, attention):
    """A row of two documents with restarting position ids, no attention mask and no cache:
    each document's logits equal those of the document alone (the block-diagonal mask
    transformers builds from the position ids, checked rather than trusted). With the cache a
    forward makes by default (use_cache), transformers does not look for packed documents: the
    job passes use_cache=False."""
    from transformers import AutoModelForCausalLM

    import moekit.hf  # noqa: F401  (the "moekit" experts backend)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            chat[0], attn_implementation=attention, experts_implementation="moekit"
        ).eval()
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 300, (1, 11), generator=generator)
    b = torch.randint(0, 300, (1, 7), generator=generator)
    row = torch.cat([a, b], dim=1)  # [1, 18]
    positions = torch.cat([torch.arange(11), torch.arange(7)]).unsqueeze(0)  # [1, 18]
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits
        cached = model(input_ids=row, position_ids=positions).logits
        alone = [model(input_ids=doc).logits for doc in (a, b)]
    torch.testing.assert_close(packed[:, :11], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 11:], alone[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cached[:, 11:], alone[1], atol=1e-3)  # the trap


def test_packed_and_padded_rows_give_the_same_val_loss(chat, tmp_path):
    packed = _job(chat, tmp_path / "packed")
    padded = _job(chat, tmp_path / "padded", packing=False)
    assert len(packed.eval_source) < len(padded.eval_source)  # packing did pack
    a, b = packed.evaluate(), padded.evaluate()
    assert a["val_tokens"] == b["val_tokens"] > 0
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def _one_step(job, mask_row: int | None = None) -> dict[str, torch.Tensor]:
    from moekit.train.loop import Loop

    loop = Loop(job)
    if mask_row is not None:  # a micro-batch with no supervised token
        draw = job.micro_batches

        def micro_batches(k):
            micros, count = draw(k)
            batch = micros[mask_row]
            masked = batch._replace(targets=torch.full_like(batch.targets, -100))
            lost = int((batch.targets != -100).sum())
            return [*micros[:mask_row], masked, *micros[mask_row + 1 :]], count - lost

        job.micro_batches = micro_batches
    metrics = loop.train_step()
    return {n: p.detach().clone() for n, p in job.trained.items()}, metrics


@pytest.mark.parametrize("lora,packing", [(None, False), (2, False), (2, True)])
def test_one_step_is_the_same_update_at_any_grad_accum(chat, tmp_path, lora, packing):
    """float64, supervised lengths differing tenfold between rows: --grad-accum 1, 2 and 8 give
    the same weights and the same loss; so does 8 with one micro-batch emptied of supervised
    tokens against 1 with the same row emptied (the loss is the sum over the step's supervised
    tokens over their number, not a mean of micro-batch means)."""
    lora_args = {"packing": packing} | ({} if lora is None else {"lora_rank": lora})
    runs = {}
    lora_args |= {"batch_size": 8}
    for k in (1, 2, 8):
        job = _job(chat, tmp_path / f"k{k}", dtype="float64", grad_accum=k, **lora_args)
        micros, _ = job.micro_batches(k)
        job.stream.restore(batches_start(job))
        counts = [int((m.targets != -100).sum()) for m in micros]
        if k == 8 and not packing:  # one record a row: supervised lengths differ
            assert max(counts) >= 5 * min(counts), counts
        runs[k] = _one_step(job)
    for k in (2, 8):
        assert runs[k][1]["loss"] == pytest.approx(runs[1][1]["loss"], rel=1e-12)
        for name, value in runs[1][0].items():
            torch.testing.assert_close(runs[k][0][name], value, rtol=1e-10, atol=1e-12)
    # row 2 of the batch has no supervised token: micro-batch 2 of 8, or inside the 1
    empty4 = _one_step(_job(chat, tmp_path / "e4", dtype="float64", grad_accum=8, **lora_args), 2)
    job1 = _job(chat, tmp_path / "e1", dtype="float64", grad_accum=1, **lora_args)
    draw = job1.micro_batches

    def masked_row(k):
        (batch,), count = draw(k)
        targets = batch.targets.clone()
        lost = int((targets[2] != -100).sum())
        targets[2] = -100
        return [batch._replace(targets=targets)], count - lost

    job1.micro_batches = masked_row
    empty1 = _one_step(job1)
    assert empty4[1]["loss"] == pytest.approx(empty1[1]["loss"], rel=1e-12)
    for name, value in empty1[0].items():
        torch.testing.assert_close(empty4[0][name], value, rtol=1e-10, atol=1e-12)
    moved = any(not torch.equal(empty1[0][n], runs[1][0][n]) for n in empty1[0])
    assert moved  # the emptied row mattered


def batches_start(job) -> dict:
    """The stream's state at the start (to undo a draw)."""
    from moekit.train.batches import TrainStream

    return TrainStream(job.train_source, job.cfg.batch_size, job.cfg.seed).state()


def test_bfloat16_keeps_float32_master_weights(chat, tmp_path):
    """--dtype bfloat16: frozen weights bfloat16, trained ones float32 (and Adam's moments);
    a full fine-tune at lr 1e-5 moves (nearly) every weight, as in float32."""
    job = _job(chat, tmp_path / "lora", dtype="bfloat16", lora_rank=2)
    assert all(p.dtype == torch.float32 for p in job.trained.values())
    frozen = [p for p in job.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    moved = {}
    for dtype in ("bfloat16", "float32"):
        full = _job(chat, tmp_path / f"full-{dtype}", dtype=dtype, lr=1e-5)
        before = {n: p.detach().float().clone() for n, p in full.trained.items()}
        from moekit.train.loop import Loop

        loop = Loop(full)
        for _ in range(3):
            loop.train_step()
        changed = sum(int((p.detach().float() != before[n]).sum()) for n, p in full.trained.items())
        moved[dtype] = changed / sum(t.numel() for t in before.values())
        state = full.optimizer.state[next(iter(full.trained.values()))]
        assert state["exp_avg"].dtype == torch.float32
    assert moved["bfloat16"] > 0.8 and moved["float32"] > 0.8, moved


def test_activation_checkpointing_and_epochs(chat, tmp_path):
    """--activation-checkpointing: the same step in float64 (recomputed layers); --epochs E:
    E passes over the packed rows."""
    from moekit.train.loop import total_steps

    plain = _one_step(_job(chat, tmp_path / "plain", dtype="float64", lora_rank=2))
    job = _job(chat, tmp_path / "ckpt", dtype="float64", lora_rank=2, activation_checkpointing=True)
    recomputed = _one_step(job)
    assert recomputed[1]["loss"] == pytest.approx(plain[1]["loss"], rel=1e-12)
    for name, value in plain[0].items():
        torch.testing.assert_close(recomputed[0][name], value, rtol=1e-10, atol=1e-12)
    job = _job(chat, tmp_path / "epochs", epochs=2.0, batch_size=2)
    assert total_steps(job.cfg, job) == 2 * -(-len(job.train_source) // 2)


def test_cli_chat_finetune_writes_adapter_merged_model_and_tokenizers(chat, tmp_path, capsys):
    """`moekit finetune` on chat records with --no-progress: the held-out lines print; OUT/final
    (the adapter) and OUT/merged (the merged model) both carry the tokenizer and its chat
    template."""
    from transformers import AutoTokenizer

    from moekit.cli import main

    model, data = chat
    out = tmp_path / "run"
    args = ["finetune", "--model", str(model), "--data", str(data), "--out", str(out)]
    args += ["--steps", "2", "--eval-interval", "1", "--seq-len", "128", "--batch-size", "4"]
    args += ["--lora-rank", "2", "--merge", "--no-track", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "step 0: val loss" in printed and "step 2: val loss" in printed
    for directory in ("final", "merged"):
        tokenizer = AutoTokenizer.from_pretrained(out / directory)
        assert tokenizer.chat_template and "generation" in tokenizer.chat_template, directory
    assert (out / "merged" / "config.json").is_file()


@pytest.mark.parametrize("packing", [True, False])
def test_padding_is_never_routed_into_the_statistics(chat, tmp_path, packing):
    """The patched routers count the real tokens of a step only (k pairs each): neither packed
    rows' tail padding nor padded rows' (the counts feed health and the bias update)."""
    job = _job(chat, tmp_path / "run", packing=packing, aux_loss_coef=0.01)
    (micro,), _ = job.micro_batches(1)
    assert (micro.attention_mask == 0).any()  # there is padding to leave out
    job.forward_backward(micro, 1.0, 1.0, True)
    top_k = job.model.config.num_experts_per_tok
    for router in job.routers:
        assert int(router.counts.sum()) == micro.num_tokens() * top_k


def test_config_file_sits_between_defaults_and_flags(chat, tmp_path, monkeypatch):
    """`moekit finetune --config run.toml`: the file's keys (flag names, old aliases too) over
    the defaults, the flags over the file."""
    import moekit.hf.finetune as finetune_module
    from moekit.cli import main

    seen = {}

    def fake_finetune(cfg, resume=False, on_eval=None):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(finetune_module, "finetune", fake_finetune)
    model, data = chat
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'model = "{model}"\ndata = "{data}"\nout = "{tmp_path / "run"}"\n'
        'steps = 7\nlearning_rate = 0.003\nlora_rank = 4\nlora_targets = ["experts", "router"]\n'
        'schedule = "cosine"\npacking = false\n'
    )
    with pytest.raises(SystemExit):
        main(["finetune", "--config", str(toml), "--steps", "9", "--no-track"])
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.lr, cfg.lora_rank, cfg.schedule) == (9, 0.003, 4, "cosine")
    assert cfg.lora_targets == ("experts", "router") and cfg.packing is False
    assert cfg.track is False and cfg.model == str(model)
