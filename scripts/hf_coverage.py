"""docs/hf.md's coverage table from the installed transformers: `python scripts/hf_coverage.py`.

For each MoE family: whether its experts are on transformers' ExpertsInterface (then
`experts_implementation="moekit"` runs them; tests/test_hf_backend.py checks each family that
builds small), whether `patch_model` patches every block (the router classes it read), and
why not.
"""

from __future__ import annotations

import warnings

from moekit.hf import TinyModelError, moe_families, tiny_model
from moekit.hf.patch import holds_experts, is_patched, patch_model, router_of


def row(family) -> tuple[str, str, str, str]:
    try:
        model = tiny_model(family)
    except TinyModelError as error:
        reason = str(error).split(": ", 1)[1][:160]
        backend = "✓ (untested)" if family.on_interface else "✗"
        return family.name, backend, "?", f"no tiny model: {reason}"
    blocks = [m for m in model.modules() if holds_experts(m)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        count = patch_model(model)
    backend = "✓" if family.on_interface else "✗ (not on the interface)"
    reason = " ".join(
        str(w.message).split(": ", 1)[-1] for w in record if "left these" in str(w.message)
    )[:200]
    routers = sorted({type(router_of(b)[0]).__name__ for b in blocks if is_patched(b)})
    patch = "✓" if count == len(blocks) else ("partly" if count else "✗")
    if routers:
        patch += " " + ", ".join(routers)
    return family.name, backend, patch, reason


def main() -> None:
    rows = [row(f) for f in moe_families()]
    print("| family | backend | patch | reason |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    on = sum(f.on_interface for f in moe_families())
    built = [r for r in rows if not r[3].startswith("no tiny model")]
    tested = sum(r[1] == "✓" for r in built)
    patched = sum(r[2].startswith("✓") for r in built)
    share = 100 * patched / max(1, len(built))
    print(
        f"\n{len(rows)} families; {on} on the ExpertsInterface, {tested} of them built small "
        f"and tested; {len(built)} build small, {patched} of those patched ({share:.0f}%)."
    )


if __name__ == "__main__":
    main()
