"""The per-layer plan table that ``compress plan`` prints."""
from __future__ import annotations

from compress.run.pipeline import Prepared


def format_plan(prepared: Prepared) -> str:
    """The per-layer table: weights, trained, density and mode, with totals and density vs sparsity."""
    rows = prepared.rows
    width = max([len("parameter")] + [len(r.name) for r in rows])
    lines = [f"{'parameter':<{width}}  {'shape':<18} {'weights':>11} {'trained':>10} {'density':>9}  mode"]
    for r in rows:
        flag = "  <- collapsed" if r.weights and r.trained == 0 else ""
        shape = "x".join(str(s) for s in r.shape)
        kind = "  (interspace coefficients)" if r.kind == "coefficients" else ""
        lines.append(
            f"{r.name:<{width}}  {shape:<18} {r.weights:>11,} {r.trained:>10,} {r.density:>9.4%}  {r.mode}{kind}{flag}"
        )
    total = sum(r.weights for r in rows)
    trained = sum(r.trained for r in rows)
    density = trained / total if total else 1.0
    lines.append(f"{'total':<{width}}  {'':<18} {total:>11,} {trained:>10,} {density:>9.4%}")
    c = prepared.config
    all_params = sum(p.numel() for p in prepared.model.parameters())
    if prepared.interspace_layers:
        bases = sum(prepared.model.get_parameter(f"{layer}.basis").numel() for layer in prepared.interspace_layers)
        lines.append(f"interspace: {len(prepared.interspace_layers)} convolutions as coefficients over {c.basis} filter "
                     f"bases ({bases:,} basis entries, {'fixed' if c.fixed_basis else 'trained'}); density counts "
                     "coefficients of those layers and weights of the others")
    lines.append(
        f"model {c.model} ({all_params:,} parameters), method {c.method}, "
        f"score {prepared.plan.score if prepared.plan is not None else c.score}, mode {c.mode}, "
        f"scope {c.scope}: density {density:.4%} trained = sparsity {1 - density:.4%} "
        f"{'pruned' if c.mode == 'prune' else 'frozen'} ({total / max(trained, 1):.1f}x fewer trained weights)"
    )
    return "\n".join(lines)
