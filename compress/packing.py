"""Pack a finished run directory into one artifact holding only what was trained (formats/SPEC.md)."""
from __future__ import annotations

from compress.errors import UserError
from pathlib import Path

import numpy as np
import safetensors
import torch

from compress.config import STORED_RUN_DEFAULTS
from compress.init import init_rules
from formats.interspace import to_interspace, to_standard_state_dict
from formats.models import build_model
from formats.rng import GENERATOR_NAME, GENERATOR_VERSION
from compress.run.rundir import read_json_object, read_tensor_file
from formats.artifact import VALUE_DTYPES, dense_fp32_bytes, write_artifact
from formats.atomic import check_output_file, write_atomic

LAYOUTS = ("compact", "plain")  # format version 5 (entropy-coded) or versions 1 to 4 (one tensor per stored tensor)
MANIFEST_CONFIG_KEYS = ("data", "subset", "epochs", "batch_size", "lr", "optimizer", "momentum", "nesterov",
                        "schedule", "weight_decay", "score_batches", "score_batch_size", "include_bias", "scores", "gamma",
                        "basis_in_budget", "score_mode")


SUMMARY_KEYS = ("model", "input_shape", "num_classes", "mode", "method", "score", "scope", "density",
                "requested_density", "trained_params", "total_params", "test_acc")


_FIX = "the run directory is damaged: resume or rerun the run"


def _read_json(path: Path, what: str) -> dict:
    return read_json_object(path, f"{what}: {_FIX}")


def _read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    return read_tensor_file(path, what, _FIX)


def check_run_consistency(state: dict, masks: dict, mode: str, seed: int, model: torch.nn.Module) -> None:
    """Untrained entries must be exactly zero (prune) or exactly the seeded init (freeze)."""
    rules = init_rules(model)
    for name, mask in masks.items():  # boolean tensors only: no copy of the (mostly untrained) entries
        if mode == "prune":
            differs = state[name] != 0
        else:
            differs = state[name] != rules[name].generate(seed, name, state[name].shape)
        if bool(differs.logical_and_(~mask).any()):
            what = "zero" if mode == "prune" else "their seeded initial value"
            raise UserError(f"run is inconsistent: untrained entries of {name} are not {what}")


def trained_directory(run_dir: Path, level: int | None) -> Path:
    """Where the finished model to pack is: the run directory, or one level of a run of levels (the last
    by default)."""
    if not (run_dir / "level_0").is_dir():
        if level is not None:
            raise UserError(f"--level applies to runs of levels (--method imp); {run_dir} has none: drop --level")
        return run_dir
    if level is None:
        if not (run_dir / "summary.json").is_file():
            raise UserError(f"{run_dir} is not finished; finish it with compress train --resume {run_dir}, or pack "
                            "a finished level with --level K")
        level = _read_json(run_dir / "summary.json", "run summary").get("level")
        if isinstance(level, bool) or not isinstance(level, int) or level < 0:
            raise UserError(f"{run_dir}/summary.json does not name its last level; the run directory is damaged")
    directory = run_dir / f"level_{level}"
    if isinstance(level, bool) or level < 0 or not directory.is_dir():
        levels = sorted(int(p.name[6:]) for p in run_dir.glob("level_*") if p.name[6:].isdigit())
        raise UserError(f"{run_dir} has no level {level}; its levels are {', '.join(map(str, levels))}")
    return directory


def pack_run(run_dir: str | Path, out: str | Path, values: str = "fp16", force: bool = False,
             level: int | None = None, evaluate: bool = False, layout: str = "compact") -> dict:
    """Write the artifact of the finished run in ``run_dir`` to ``out`` (atomically); returns its report.

    For a run of levels (IMP) the last level is packed, or ``level``. An existing ``out`` is replaced only
    with ``force``. ``evaluate`` measures the test accuracy of the packed model against the run's own
    (unpacked) model on the run's data and records both in the manifest (``eval``): the cost of lossy values.
    ``layout`` is ``compact`` (format version 5, entropy-coded: the smallest) or ``plain`` (versions 1 to 4)."""
    import compress
    import formats

    run_dir, out = Path(run_dir), Path(out)
    if values not in VALUE_DTYPES:
        raise UserError(f"unknown --values {values!r}; known: {', '.join(VALUE_DTYPES)}")
    if layout not in LAYOUTS:
        raise UserError(f"unknown --layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    trained = trained_directory(run_dir, level)
    if not (trained / "summary.json").is_file() or not (trained / "model.safetensors").is_file():
        raise UserError(f"{trained} is not a finished run (no summary.json/model.safetensors); finish it with "
                        f"compress train --resume {run_dir}")
    check_output_file(out, force)
    config = {**STORED_RUN_DEFAULTS, **_read_json(run_dir / "config.json", "run config")}
    summary = _read_json(trained / "summary.json", "run summary")
    missing = [key for key in SUMMARY_KEYS if key not in summary] + (["seed"] if "seed" not in config else [])
    if missing:
        raise UserError(f"{run_dir} lacks {', '.join(missing)} in summary.json/config.json; the run directory is "
                        "damaged or from another tool: rerun it")
    state = _read_tensors(trained / "model.safetensors", "trained model")
    masks_path = trained / "final_masks.safetensors"  # masks that moved during training (dynamic sparse)
    if not masks_path.is_file():
        masks_path = trained / "masks.safetensors"
    masks = {k: v.bool() for k, v in _read_tensors(masks_path, "masks").items()} if masks_path.is_file() else {}
    architecture = {"model": summary["model"], "input_shape": summary["input_shape"],
                    "num_classes": summary["num_classes"]}
    # shapes and init rules only, unless the model evaluates: a meta model costs no memory
    model = build_model(architecture["model"], tuple(architecture["input_shape"]), architecture["num_classes"],
                        device=None if evaluate else "meta")
    interspace = summary.get("interspace")
    if interspace:
        to_interspace(model, interspace["basis"], interspace["trainable_basis"])
        architecture["interspace"] = {"layers": list(interspace["layers"])}
    reference = model.state_dict()
    if sorted(state) != sorted(reference) or any(state[k].shape != reference[k].shape for k in reference):
        raise UserError(f"{trained}/model.safetensors does not match the architecture {architecture['model']}")
    state = {name: state[name] for name in reference}  # the model's own order
    bad = sorted(name for name, mask in masks.items() if name not in state or mask.shape != state[name].shape)
    if bad:
        raise UserError(f"{masks_path} has masks that do not fit the model: {bad}; the run directory is damaged")
    mode = summary["mode"] if masks else "dense"
    check_run_consistency(state, masks, mode, config["seed"], model)
    rules = {name: rule.as_dict() for name, rule in init_rules(model).items()}
    manifest = {
        "method": summary["method"], "score": summary["score"], "scope": summary["scope"],
        "density": summary["density"], "requested_density": summary["requested_density"],
        "trained_params": summary["trained_params"], "total_params": summary["total_params"],
        "test_acc": summary["test_acc"],
        "normalization": summary.get("normalization", {}),
        **({"class_names": summary["class_names"]} if summary.get("class_names") else {}),
        **({"level": summary["level"], "strategy": summary.get("strategy")} if summary.get("level") is not None else {}),
        "config": {key: config.get(key) for key in MANIFEST_CONFIG_KEYS},
        "versions": {"compress": compress.__version__, "torch": torch.__version__.split("+")[0],
                     "numpy": np.__version__, "safetensors": safetensors.__version__},
    }
    plain = to_standard_state_dict(state, interspace["layers"]) if interspace else state
    dense_bytes = dense_fp32_bytes(plain)
    def encode() -> bytes:
        return write_artifact(
            state, masks, mode=mode, seed=config["seed"], architecture=architecture, init_rules=rules,
            manifest=manifest, values=values, dense_fp32_bytes=dense_bytes,
            generator={"name": GENERATOR_NAME, "version": GENERATOR_VERSION}, compact=layout == "compact",
        )

    data = encode()
    if evaluate:
        manifest["eval"] = packed_against_unpacked(config, model, state, data)
        data = encode()
    write_atomic(out, data, overwrite=force)
    return formats.read_info(out)


def packed_against_unpacked(config: dict, model: torch.nn.Module, state: dict, data: bytes) -> dict:
    """Test accuracy of the run's model and of the packed artifact ``data`` on the run's data set."""
    from compress.config import config_from_dict
    from compress.run.pipeline import load_run_data
    from compress.training import evaluate
    from formats.artifact import build_architecture, parse_artifact, rebuild_state_dict

    run_config = config_from_dict({k: v for k, v in config.items() if k != "device"}).resolved()
    loaded = load_run_data(run_config)
    cpu = torch.device("cpu")
    model.load_state_dict(state)
    unpacked = evaluate(model, loaded.test, 256, cpu)["acc"]
    artifact = parse_artifact(data)
    rebuilt = rebuild_state_dict(artifact)
    layers = artifact.schema["architecture"].get("interspace", {}).get("layers", [])
    packed_model = build_architecture(artifact.schema["architecture"])
    packed_model.load_state_dict(to_standard_state_dict(rebuilt, layers) if layers else rebuilt)
    packed = evaluate(packed_model, loaded.test, 256, cpu)["acc"]
    return {"data": run_config.data, "samples": len(loaded.test), "test_acc_unpacked": unpacked,
            "test_acc_packed": packed}


def pack_and_report(run_dir: str | Path, out: str | Path, values: str = "fp16", force: bool = False,
                    level: int | None = None, evaluate: bool = False, layout: str = "compact") -> str:
    """What ``compress pack`` does: pack, then the storage report as text."""
    from formats.report import format_info

    info = pack_run(run_dir, out, values, force, level, evaluate, layout)
    return f"wrote {out}\n" + format_info(info)


def evaluate_artifact(path: str | Path, data: str | None, data_root: str | None, batch_size: int,
                      device: str = "auto") -> str:
    """What ``compress eval`` does: load the packed model, then report its test accuracy.

    The model is loaded (and so the whole artifact checked) before any data. Without ``data``, the data
    set named in the artifact is used only if it is a built-in name: a path from a file (``imagefolder:``)
    is never opened unless the user passes it with ``--data``.
    """
    import formats
    from compress.data import DATASETS, load_data
    from compress.run import resolve_device
    from compress.training import evaluate

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch-size must be a positive integer, got {batch_size}")
    if data_root is not None and not Path(data_root).is_dir():
        raise UserError(f"data root {data_root} does not exist")
    torch_device = resolve_device(device)
    info = formats.read_info(path)
    schema = info["schema"]
    model = formats.load(path)
    name = data
    if name is None:
        named = schema["manifest"].get("config", {}).get("data") if isinstance(schema["manifest"].get("config"), dict) else None
        if not isinstance(named, str) or not named:
            raise UserError("the artifact does not name its data set; pass --data")
        if named.partition(":")[0] not in DATASETS or named.startswith("imagefolder"):
            shown = named if len(named) <= 80 and named.isprintable() else repr(named[:80]) + "..."
            raise UserError(f"the artifact was trained on {shown}, which is not a built-in data set; a path named "
                            "in an artifact is never opened: pass the data with --data (e.g. --data imagefolder:PATH)")
        name = named
    architecture = schema["architecture"]
    shape = tuple(architecture["input_shape"])
    loaded = load_data(name, data_root, seed=schema["seed"], shape=shape if name == "synthetic" or name.startswith("imagefolder:") else None,
                       num_classes=architecture["num_classes"] if name == "synthetic" else None)
    if tuple(loaded.input_shape) != shape or loaded.num_classes != architecture["num_classes"]:
        raise UserError(f"data set {name} has inputs {loaded.input_shape} and {loaded.num_classes} classes; the "
                        f"model expects {shape} and {architecture['num_classes']}")
    model = model.to(torch_device)
    result = evaluate(model, loaded.test, batch_size, torch_device)
    return (f"{path}: test accuracy {result['acc']:.2%} (loss {result['loss']:.4f}) on {len(loaded.test):,} "
            f"samples of {name}")
