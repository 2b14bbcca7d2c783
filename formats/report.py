"""Human-readable storage report of an artifact (``compress info``)."""
from __future__ import annotations


def _size(count: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f} B"


def format_info(info: dict) -> str:
    """Per-tensor and total bytes of values, masks and header, against the mask limit and dense fp32."""
    schema, rows, totals = info["schema"], info["tensors"], info["totals"]
    width = max([len("tensor")] + [len(r["name"]) for r in rows])
    lines = [
        f"{'tensor':<{width}}  {'kind':<6} {'trained':>10} {'total':>11} {'density':>9} {'values B':>10} "
        f"{'mask B':>8} {'limit B':>9} {'bits/trained':>12}"
    ]
    for r in rows:
        bits = f"{r['bits_per_trained']:.2f}" if r["bits_per_trained"] is not None else "-"
        limit = f"{r['mask_limit_bytes']:.1f}" if r["kind"] == "masked" else "-"
        lines.append(
            f"{r['name']:<{width}}  {r['kind']:<6} {r['trained']:>10,} {r['total']:>11,} {r['density']:>9.4%} "
            f"{r['value_bytes']:>10,} {r['mask_bytes']:>8,} {limit:>9} {bits:>12}"
        )
    t = totals
    manifest = schema["manifest"]
    accuracy = manifest.get("test_acc")
    lines += [
        "",
        f"model {schema['architecture']['model']} {schema['architecture']['input_shape']}, mode {schema['mode']}, "
        f"method {manifest.get('method')}, seed {schema['seed']}, values {schema['values']}"
        + (f", test acc {accuracy:.2%}" if isinstance(accuracy, (int, float)) else ""),
        f"masked weights : {t['masked_trained']:,} of {t['masked_total']:,} trained "
        f"(density {t['density']:.4%}, sparsity {1 - t['density']:.4%})",
        f"trained values : {t['value_bytes']:>10,} B",
        f"masks          : {t['mask_bytes']:>10,} B   (information limit {t['mask_limit_bytes']:,.0f} B, "
        f"ratio {t['mask_bytes'] / t['mask_limit_bytes'] if t['mask_limit_bytes'] else 1:.3f})",
        f"dense tensors  : {t['dense_bytes']:>10,} B   (biases, norms, buffers)",
        *([f"filter bases   : {t['basis_bytes']:>10,} B   ({t['interspace_layers']} interspace layers)"]
          if t.get("interspace_layers") else []),
        f"header         : {t['header_bytes']:>10,} B",
        f"artifact       : {t['file_bytes']:>10,} B   ({_size(t['file_bytes'])})"
        + (f", {t['bits_per_trained']:.2f} bits per trained weight (values + mask)" if t["bits_per_trained"] else ""),
        f"dense fp32     : {t['dense_fp32_bytes']:>10,} B   ({_size(t['dense_fp32_bytes'])}, the same model as a "
        f"safetensors file)",
        f"saved          : {t['ratio_to_dense_fp32']:.1f}x smaller "
        f"({1 - t['file_bytes'] / t['dense_fp32_bytes']:.2%} of the storage saved)",
    ]
    return "\n".join(lines)


def info_text(path, as_json: bool = False) -> str:
    """What ``compress info`` prints: the table, or the JSON report."""
    import json

    from formats import read_info

    info = read_info(path)
    return json.dumps(info, indent=2, sort_keys=True) if as_json else format_info(info)
