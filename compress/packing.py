"""Pack a finished run directory into one artifact holding only what was trained (formats/SPEC.md)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from safetensors.torch import load_file

from compress.init import init_rules
from compress.interspace import to_interspace, to_standard_state_dict
from compress.models import build_model
from compress.rng import GENERATOR_NAME, GENERATOR_VERSION
from formats.artifact import VALUE_DTYPES, write_artifact
from formats.container import write_atomic

MANIFEST_CONFIG_KEYS = ("data", "subset", "epochs", "batch_size", "lr", "optimizer", "momentum", "nesterov",
                        "schedule", "weight_decay", "score_batches", "score_batch_size", "include_bias", "scores", "gamma")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {what} {path}: {error}") from None


def check_run_consistency(state: dict, masks: dict, mode: str, seed: int, model: torch.nn.Module) -> None:
    """Untrained entries must be exactly zero (prune) or exactly the seeded init (freeze)."""
    rules = init_rules(model)
    for name, mask in masks.items():
        untrained = state[name][~mask]
        if mode == "prune":
            expected = torch.zeros_like(untrained)
        else:
            expected = rules[name].generate(seed, name, state[name].shape)[~mask]
        if not torch.equal(untrained, expected):
            what = "zero" if mode == "prune" else "their seeded initial value"
            raise ValueError(f"run is inconsistent: untrained entries of {name} are not {what}")


def pack_run(run_dir: str | Path, out: str | Path, values: str = "fp16") -> dict:
    """Write the artifact of the finished run in ``run_dir`` to ``out`` (atomically); returns its report."""
    import compress
    import formats

    run_dir, out = Path(run_dir), Path(out)
    if values not in VALUE_DTYPES:
        raise ValueError(f"unknown --values {values!r}; known: {', '.join(VALUE_DTYPES)}")
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    if not (run_dir / "summary.json").is_file() or not (run_dir / "model.safetensors").is_file():
        raise ValueError(f"{run_dir} is not a finished run (no summary.json/model.safetensors); finish it with "
                         f"compress train --resume {run_dir}")
    if out.exists() and out.is_dir():
        raise ValueError(f"output {out} is a directory; give a file name such as {out / 'model.cpk'}")
    if not out.parent.is_dir():
        raise ValueError(f"cannot write {out}: directory {out.parent} does not exist")
    config = _read_json(run_dir / "config.json", "run config")
    summary = _read_json(run_dir / "summary.json", "run summary")
    state = load_file(str(run_dir / "model.safetensors"))
    masks_path = run_dir / "masks.safetensors"
    masks = {k: v.bool() for k, v in load_file(str(masks_path)).items()} if masks_path.is_file() else {}
    architecture = {"model": summary["model"], "input_shape": summary["input_shape"],
                    "num_classes": summary["num_classes"]}
    model = build_model(architecture["model"], tuple(architecture["input_shape"]), architecture["num_classes"])
    interspace = summary.get("interspace")
    if interspace:
        to_interspace(model, interspace["basis"], interspace["trainable_basis"])
        architecture["interspace"] = {"layers": list(interspace["layers"])}
    reference = model.state_dict()
    if sorted(state) != sorted(reference) or any(state[k].shape != reference[k].shape for k in reference):
        raise ValueError(f"{run_dir}/model.safetensors does not match the architecture {architecture['model']}")
    state = {name: state[name] for name in reference}  # the model's own order
    mode = summary["mode"] if masks else "dense"
    check_run_consistency(state, masks, mode, config["seed"], model)
    rules = {name: rule.as_dict() for name, rule in init_rules(model).items()}
    manifest = {
        "method": summary["method"], "score": summary["score"], "scope": summary["scope"],
        "density": summary["density"], "requested_density": summary["requested_density"],
        "trained_params": summary["trained_params"], "total_params": summary["total_params"],
        "test_acc": summary["test_acc"],
        "normalization": summary.get("normalization", {}),
        "config": {key: config.get(key) for key in MANIFEST_CONFIG_KEYS},
        "versions": {"compress": compress.__version__, "torch": torch.__version__.split("+")[0],
                     "numpy": np.__version__, "safetensors": safetensors.__version__},
    }
    plain = to_standard_state_dict(state, interspace["layers"]) if interspace else state
    dense_bytes = len(safetensors.torch.save({k: v.float() if v.is_floating_point() else v for k, v in plain.items()}))
    data = write_artifact(
        state, masks, mode=mode, seed=config["seed"], architecture=architecture, init_rules=rules,
        manifest=manifest, values=values, dense_fp32_bytes=dense_bytes,
        generator={"name": GENERATOR_NAME, "version": GENERATOR_VERSION},
    )
    write_atomic(out, data)
    return formats.read_info(out)


def pack_and_report(run_dir: str | Path, out: str | Path, values: str = "fp16") -> str:
    """What ``compress pack`` does: pack, then the storage report as text."""
    from formats.report import format_info

    info = pack_run(run_dir, out, values)
    return f"wrote {out}\n" + format_info(info)


def evaluate_artifact(path: str | Path, data: str | None, data_root: str | None, batch_size: int,
                      device: str = "auto") -> str:
    """What ``compress eval`` does: load the packed model and report test accuracy."""
    import formats
    from compress.data import load_data
    from compress.run import resolve_device
    from compress.training import evaluate

    info = formats.read_info(path)
    schema = info["schema"]
    name = data or schema["manifest"].get("config", {}).get("data")
    if not name:
        raise ValueError("the artifact does not name its data set; pass --data")
    if data_root is not None and not Path(data_root).is_dir():
        raise ValueError(f"data root {data_root} does not exist")
    if isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch-size must be a positive integer, got {batch_size}")
    architecture = schema["architecture"]
    shape = tuple(architecture["input_shape"])
    loaded = load_data(name, data_root, seed=schema["seed"], shape=shape if name == "synthetic" or name.startswith("imagefolder:") else None,
                       num_classes=architecture["num_classes"] if name == "synthetic" else None)
    if tuple(loaded.input_shape) != shape or loaded.num_classes != architecture["num_classes"]:
        raise ValueError(f"data set {name} has inputs {loaded.input_shape} and {loaded.num_classes} classes; the "
                         f"model expects {shape} and {architecture['num_classes']}")
    torch_device = resolve_device(device)
    model = formats.load(path).to(torch_device)
    result = evaluate(model, loaded.test, batch_size, torch_device)
    return (f"{path}: test accuracy {result['acc']:.2%} (loss {result['loss']:.4f}) on {len(loaded.test):,} "
            f"samples of {name}")
