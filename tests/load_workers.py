"""Ranks of sharded loading, run by test_stream.py (`spawn.run_ranks`, gloo): each rank reads
its experts only (`load_model(shard=...)`), `expert_parallel` installs them, `verify_experts`
checks them against the files; a fault can be injected into the reader on one rank."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def sharded_load(rank: int, world: int, model_dir: str, quantize, fault) -> dict:
    """{"rows": {name: this rank's rows}, "first": {name: first expert}, "logits": the
    expert-parallel model's logits on a fixed batch, "verified": the report's summary} or
    {"fault": the LoaderFault's message}."""
    from moekit.hf import stream
    from moekit.hf.load import load_model
    from moekit.hf.parallel import expert_parallel
    from moekit.hf.verify import LoaderFault, verify_experts

    if fault is not None and rank == fault["rank"]:
        read = stream._read_rows
        shift, transpose = fault.get("shift", 0), fault.get("transpose", False)

        def faulty(cmap, name, e):
            rows = read(cmap, name, e + shift)
            return rows.T.contiguous() if transpose and name.endswith("gate_up_proj") else rows

        stream._read_rows = faulty
    model = load_model(Path(model_dir), torch.float32, quantize, shard=(rank, world))
    expert_parallel(model)
    try:
        report, found = verify_experts(model, Path(model_dir)), None
    except LoaderFault as error:
        report, found = None, str(error)
    faults = torch.tensor([found is not None], dtype=torch.int64)
    dist.all_reduce(faults)  # a rank that found a fault stops every rank before the forward
    if faults.item():
        return {"fault": found} if found else {"verified": report.summary()}
    rows, first = {}, {}
    for name, module in model.named_modules():
        shard = module.__dict__.get(stream.SHARD)
        if shard is None:
            continue
        first[name] = shard[0]
        for attr in stream.stacked_names(module):
            if quantize is not None and f"{attr}_qdata" in module._buffers:
                rows[f"{name}.{attr}_qdata"] = module.get_buffer(f"{attr}_qdata").clone()
            else:
                rows[f"{name}.{attr}"] = getattr(module, attr).detach().clone()
    ids = torch.arange(2 * 12).remainder(model.config.vocab_size).view(2, 12)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"rows": rows, "first": first, "logits": logits, "verified": report.summary()}
