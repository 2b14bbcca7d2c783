"""Human-readable storage report of an artifact (``compress info``).

The reader validates every number it reports, but the formatting does not rely on it: a ratio with a
zero or non-finite side, or a number that does not fit a float, is shown as "-", never as a traceback
or "inf".
"""
from __future__ import annotations

import math


def _finite(value) -> bool:
    """A number that converts to a finite float (not a bool, not inf or NaN, not an int beyond float range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(value, spec: str) -> str:
    """``value`` formatted with ``spec``, or "-" if it is not a finite number."""
    return format(value, spec) if _finite(value) else "-"


def _ratio(numerator, denominator) -> float | None:
    """numerator / denominator as a finite float, or None (zero, non-finite or mistyped sides)."""
    try:
        ratio = numerator / denominator
    except (ArithmeticError, TypeError):  # ZeroDivisionError, OverflowError
        return None
    return ratio if _finite(ratio) else None


def _size(count) -> str:
    if not _finite(count):
        return "-"
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{_number(_ratio(count, scale), '.2f')} {unit}"
    return f"{_number(count, '.0f')} B"


def format_info(info: dict) -> str:
    """Per-tensor and total bytes of values, masks and header, against the mask limit and dense fp32."""
    schema, rows, totals = info["schema"], info["tensors"], info["totals"]
    width = max([len("tensor")] + [len(r["name"]) for r in rows])
    lines = [
        f"{'tensor':<{width}}  {'kind':<6} {'trained':>10} {'total':>11} {'density':>9} {'values B':>10} "
        f"{'mask B':>8} {'limit B':>9} {'bits/trained':>12}"
    ]
    for r in rows:
        limit = _number(r["mask_limit_bytes"], ".1f") if r["kind"] == "masked" else "-"
        lines.append(
            f"{r['name']:<{width}}  {r['kind']:<6} {_number(r['trained'], ','):>10} {_number(r['total'], ','):>11} "
            f"{_number(r['density'], '.4%'):>9} {_number(r['value_bytes'], ','):>10} {_number(r['mask_bytes'], ','):>8} "
            f"{limit:>9} {_number(r['bits_per_trained'], '.2f'):>12}"
        )
    t = totals
    manifest = schema["manifest"]
    accuracy = manifest.get("test_acc")
    density = t["density"]
    sparsity = 1 - density if _finite(density) else None
    mask_ratio = _ratio(t["mask_bytes"], t["mask_limit_bytes"]) if t["mask_limit_bytes"] else 1
    saved = _ratio(t["file_bytes"], t["dense_fp32_bytes"])
    compact = t.get("layout") == "compact"
    lines += [
        *(["(per-tensor values B are before entropy coding: the compact layout codes all tensors' values together)"]
          if compact else []),
        "",
        f"model {_architecture(schema['architecture'])}, mode {schema['mode']}, "
        f"method {manifest.get('method')}, seed {schema['seed']}, values "
        + (f"{schema['quantized']} (one float32 scale per tensor; dense tensors {schema['values']})"
           if schema.get("quantized") else schema["values"])
        + (f", test acc {accuracy:.2%}" if _finite(accuracy) else ""),
        *_evaluation(manifest.get("eval")),
        f"masked weights : {_number(t['masked_trained'], ',')} of {_number(t['masked_total'], ',')} trained "
        f"(density {_number(density, '.4%')}, sparsity {_number(sparsity, '.4%')})",
        f"trained values : {_number(t['value_bytes'], '>10,')} B"
        + (f"   (entropy-coded from {_number(t.get('value_raw_bytes'), ',')} B, "
           f"{_number(_ratio(8 * t['value_bytes'], t['masked_trained']), '.2f')} bits per value)" if compact else ""),
        f"masks          : {_number(t['mask_bytes'], '>10,')} B   (information limit "
        f"{_number(t['mask_limit_bytes'], ',.0f')} B, ratio {_number(mask_ratio, '.3f')}; the limit, log2 C(n, k), is "
        "that of a uniformly random mask with the same counts: a structured mask, such as SNIP's, can be coded "
        "below it)",
        f"dense tensors  : {_number(t['dense_bytes'], '>10,')} B   (biases, norms, buffers"
        + (f"; entropy-coded from {_number(t.get('dense_raw_bytes'), ',')} B)" if compact else ")"),
        *([f"filter bases   : {_number(t['basis_bytes'], '>10,')} B   ({t['interspace_layers']} interspace layers"
           + (f"; entropy-coded from {_number(t.get('basis_raw_bytes'), ',')} B)" if compact else ")")]
          if t.get("interspace_layers") else []),
        f"header         : {_number(t['header_bytes'], '>10,')} B"
        + ("   (safetensors header and the deflate-coded schema: compact layout, format version 5)" if compact
           else f"   (plain layout, format version {schema.get('version')})"),
        f"artifact       : {_number(t['file_bytes'], '>10,')} B   ({_size(t['file_bytes'])})"
        + (f", {_number(t['bits_per_trained'], '.2f')} bits per trained weight (values + mask)"
           if t["bits_per_trained"] else ""),
        f"dense fp32     : {_number(t['dense_fp32_bytes'], '>10,')} B   ({_size(t['dense_fp32_bytes'])}, the same "
        f"model as a safetensors file)",
        f"saved          : {_number(_ratio(t['dense_fp32_bytes'], t['file_bytes']), '.1f')}x smaller "
        f"({_number(1 - saved if saved is not None else None, '.2%')} of the storage saved)",
    ]
    return "\n".join(lines)


def info_text(path, as_json: bool = False) -> str:
    """What ``compress info`` prints: the table, or the JSON report."""
    import json

    from formats import read_info

    info = read_info(path)
    return json.dumps(info, indent=2, sort_keys=True) if as_json else format_info(info)


def _architecture(architecture: dict) -> str:
    """``lenet5 [1, 28, 28]``, or ``custom MyNet (load with model=...)`` for a model of the user's own."""
    if architecture["model"] == "custom":
        return f"custom {architecture['class']} (formats.load(path, model={architecture['class']}(...)))"
    return f"{architecture['model']} {architecture['input_shape']}"


def _evaluation(result) -> list[str]:
    """The line of ``compress pack --eval``'s measurement, if the artifact holds one."""
    if not isinstance(result, dict) or not (_finite(result.get("test_acc_packed"))
                                            and _finite(result.get("test_acc_unpacked"))):
        return []
    packed, unpacked = result["test_acc_packed"], result["test_acc_unpacked"]
    return [f"evaluated      : packed {packed:.2%} against the run's own {unpacked:.2%} "
            f"({100 * (packed - unpacked):+.2f} points) on {_number(result.get('samples'), ',')} test samples of "
            f"{str(result.get('data'))[:40]}"]
