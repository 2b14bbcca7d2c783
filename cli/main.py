"""``compress`` CLI. Every command parses its options and calls one function of the library."""
from __future__ import annotations

import os
import signal
import sys
import threading

import click

from compress.config import AUGMENTS, CONFIG_DEFAULTS, ON_COLLAPSE, SCORE_MODES
from compress.data import DATASETS
from formats.interspace import BASES
from compress.methods import METHODS
from formats.models import MODELS
from compress.scores import SCORES
from compress.allocation import ALLOCATIONS
from compress.selection import MODES, SCOPES
from compress.strategies import STRATEGIES, option_fields
from compress.engine import ENGINES
from compress.training import OPTIMIZERS, PRECISIONS, SCHEDULES

DENSITY_HELP = """
\b
Density and sparsity: density D is the fraction of the compressible weights (conv and linear
weights) that is TRAINED; sparsity S = 1 - D is the fraction that is not. Give exactly one:
--density 0.01 and --sparsity 0.99 mean the same run (100x fewer trained weights).
\b
Modes: what happens to the weights that are not trained.
  prune   they are zero (a sparse network; the classic pruning-at-init setting)
  freeze  they keep their random initial value, regenerated from the 32-bit seed (FreezeNet);
          they cost no storage but keep the signal flowing through the network
"""


def _methods_help() -> str:
    return "; ".join(f"{name}: {METHODS.get(name).description}" for name in METHODS.names())


def _parse_milestones(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated epoch numbers such as 30,60, got {value!r}") from None


def selection_options(function):
    """Options shared by ``train`` and ``plan``: model, data, score and selection."""
    options = [
        click.option("--config", "config_file", type=click.Path(), help="YAML or TOML file of options (keys as the long option names); command-line options override it."),
        click.option("--model", help=f"Model name: {', '.join(MODELS.names())}, or tv:<torchvision name> (e.g. "
                     f"tv:mobilenet_v3_small). [default: {CONFIG_DEFAULTS['model']}]"),
        click.option("--data", help=f"Data set: {', '.join(n + (':PATH' if n == 'imagefolder' else '') for n in DATASETS.names())}. "
                     f"[default: {CONFIG_DEFAULTS['data']}]"),
        click.option("--data-root", help="Where data sets are looked for and cached [default: a per-user cache directory; /usr/share/datasets/<name> is searched too]."),
        click.option("--data-shape", help="Input shape CxHxW for synthetic and imagefolder data, e.g. 3x32x32 "
                     "[default: 1x28x28 for synthetic; for an image folder 1 or 3 channels as its images are, 32x32]."),
        click.option("--workers", type=int, help="DataLoader processes that decode an image folder's batches while "
                     "the model trains (imagefolder: images are read lazily, so memory does not grow with the "
                     "folder), or gather the batches of a built-in set held in memory; the batches are the same "
                     "with any number; a runtime option, not part of the run's identity [default: 0, in this "
                     "process]."),
        click.option("--augment", type=click.Choice(AUGMENTS), help="Training augmentation for any data set: "
                     "flip-crop (random crop of the image padded by an eighth of its height, horizontal flip of "
                     "half the batch) or none [default: flip-crop for CIFAR, none otherwise]."),
        click.option("--num-classes", type=int, help="Class count for synthetic data [default: 10]."),
        click.option("--subset", type=int, help="Train on only the first N samples (after a seeded shuffle), for quick runs."),
        click.option("--val-split", type=float, help="Fraction of the training set held out for validation [default: 0]."),
        click.option("--method", help=f"Preset of strategy, score and mode. {_methods_help()}. "
                     f"[default: {CONFIG_DEFAULTS['method']}]"),
        click.option("--score", help=f"Override the method's at-init score: {', '.join(SCORES.names())}."),
        click.option("--scores", help="COPS (--method cops): the two scores to combine, e.g. snip,grasp [default: snip,grasp]. "
                     "Each is normalised by the sum of its absolute values (over all layers, or per layer with "
                     "--scope layer) so that its scale does not decide the result."),
        click.option("--gamma", type=float, help="COPS: keep the top of the first score subject to <s2, m> >= gamma x "
                     "the second score's best top-k value; 0 = first score only, 1 = a best set of the second. "
                     f"[default: {CONFIG_DEFAULTS['gamma']}]"),
        click.option("--mode", type=click.Choice(MODES), help="Override the method's mode: prune (zero) or freeze (seeded init)."),
        click.option("--density", type=float, help="Fraction of compressible weights trained, in (0, 1]."),
        click.option("--sparsity", type=float, help="Fraction of compressible weights not trained (= 1 - density)."),
        click.option("--scope", type=click.Choice(SCOPES), help="Top-k over all layers together (global), the same "
                     "density in every layer (layer), or ERK densities per layer (erk). [default: global; erk for "
                     "--method set/rigl]"),
        click.option("--allocation", type=click.Choice(tuple(ALLOCATIONS)), help="The per-layer densities, another "
                     "name for --scope: erk (Erdos-Renyi-kernel: a layer's density proportional to the sum of its "
                     "dimensions over their product, dense where that would exceed 1), uniform (= --scope layer) or "
                     "global (one top-k over all layers). [default: global; erk for --method set/rigl]"),
        click.option("--interspace", is_flag=True, default=None,
                     help="Interspace pruning: every KxK conv (K > 1) becomes coefficients over a per-layer filter "
                          "basis; masks, scores and freezing apply to the coefficients, the basis is trained."),
        click.option("--basis", type=click.Choice(BASES),
                     help="Initial filter basis of --interspace layers: 2-D DCT-II (orthonormal) or the spatial unit "
                          "basis (which makes interspace pruning identical to standard pruning). "
                          f"[default: {CONFIG_DEFAULTS['basis']}]"),
        click.option("--fixed-basis", is_flag=True, default=None, help="Hold the --interspace basis fixed instead of training it."),
        click.option("--basis-in-budget", is_flag=True, default=None,
                     help="Count the trained --interspace basis entries inside --density, so that interspace and "
                          "standard pruning train the same number of parameters (the masked density is lowered by "
                          "the bases' share)."),
        click.option("--include-bias/--no-include-bias", default=None, help="Also mask conv/linear biases [default: no]."),
        click.option("--score-batches", type=int, help=f"Batches used to compute the score [default: {CONFIG_DEFAULTS['score_batches']}]."),
        click.option("--score-batch-size", type=int, help=f"Samples per scoring batch [default: {CONFIG_DEFAULTS['score_batch_size']}, "
                     "as SNIP's reference]."),
        click.option("--score-mode", type=click.Choice(SCORE_MODES),
                     help="The network's mode while SNIP and GraSP score it: eval (BatchNorm on its running "
                          "statistics, no dropout), as the references do, or train (each scoring batch's own "
                          f"statistics). Other scores ignore it. [default: {CONFIG_DEFAULTS['score_mode']}]"),
        click.option("--on-collapse", type=click.Choice(ON_COLLAPSE), help="What to do when a layer would have no "
                     f"trained weight [default: {CONFIG_DEFAULTS['on_collapse']}]."),
        click.option("--seed", type=int, help=f"32-bit seed: initial weights, data order, random scores [default: {CONFIG_DEFAULTS['seed']}]."),
        click.option("--device", help="auto, cpu or cuda[:N]; a runtime option, not part of the run's identity: "
                     f"--resume takes it too [default: {CONFIG_DEFAULTS['device']}]."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _option_type(field) -> type:
    """The click type of a strategy option, from its annotation (``int | None`` -> int)."""
    annotation = str(field.type)
    for name, kind in (("int", int), ("float", float), ("bool", bool)):
        if annotation.split("|")[0].strip() == name:
            return kind
    return str


def strategy_options(function):
    """One option per field of every strategy's options dataclass (``--levels``, ``--prune-fraction``, ...)."""
    seen = {}
    for name in STRATEGIES.names():
        for field in option_fields(STRATEGIES.get(name)):
            seen.setdefault(field.name, (field, []))[1].append(name)
    for field_name, (field, owners) in reversed(sorted(seen.items())):
        methods = [m for m in METHODS.names() if METHODS.get(m).strategy in owners]
        help_text = f"[{', '.join('--method ' + m for m in methods)}] {field.metadata.get('help', '')}"
        function = click.option(f"--{field_name.replace('_', '-')}", field_name, type=_option_type(field),
                                help=help_text)(function)
    return function


def training_options(function):
    options = [
        click.option("--epochs", type=int, help="Training epochs [default: per model, 10 for LeNets, 30 for CNNs]."),
        click.option("--batch-size", type=int, help="Training batch size [default: 128]; the global batch under "
                     "torchrun, each of the N processes taking every N-th sample of it."),
        click.option("--lr", type=float, help="Peak learning rate [default: 0.05 for LeNets, 0.1 for CNNs]."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS),
                     help="sgd (with momentum), adam, or adamw (decoupled weight decay) [default: sgd]."),
        click.option("--momentum", type=float, help="SGD momentum [default: 0.9]."),
        click.option("--nesterov/--no-nesterov", default=None, help="Nesterov momentum for SGD [default: no]."),
        click.option("--schedule", type=click.Choice(SCHEDULES), help="Learning-rate schedule [default: cosine]."),
        click.option("--step-size", type=int, help="Epochs between decays for --schedule step [default: 30]."),
        click.option("--milestones", callback=_parse_milestones, help="Comma-separated decay epochs for --schedule multistep, e.g. 30,60."),
        click.option("--lr-decay", type=float, help="Decay factor of step/multistep schedules [default: 0.1]."),
        click.option("--weight-decay", type=float, help="L2 weight decay; never touches pruned or frozen entries [default: 5e-4]."),
        click.option("--eval-every", type=int, help="Evaluate on the test set every N epochs; the last epoch is "
                                                     "always evaluated. Saves time on large test sets [default: 1]."),
        click.option("--precision", type=click.Choice(PRECISIONS),
                     help="Mixed precision: the forward and backward under autocast in bf16 or fp16 (fp16 with a "
                          "dynamic loss scale), the weights kept in float32, the masks and the frozen values exact. "
                          "For GPUs (bf16 also runs on CPUs, rarely faster) [default: fp32]."),
        click.option("--engine", type=click.Choice(ENGINES),
                     help="How masked layers train. dense: every weight gradient is computed, then masked. sparse: "
                          "each masked Linear/Conv weight trains as a vector of its trained entries (gradient formed "
                          "there only, optimizer state a few percent of dense) with sparse kernels everywhere. auto: "
                          "the sparse engine, with the sparse kernels only where the benchmark shows they pay "
                          "(bench_engine.py). Engines agree to floating-point tolerance, not bit for bit; a resume "
                          "keeps the run's engine [default: auto]."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="compress-nets", prog_name="compress")
def cli():
    """Train networks in which only a few weights are learned, then pack them small.

    \b
    Typical use:
      compress plan  --model lenet5 --data synthetic --method snip --sparsity 0.99
      compress train --model lenet5 --data fashion-mnist --method freezenet --density 0.01 --epochs 2 --out runs/a
    """


@cli.command(epilog=DENSITY_HELP)
@selection_options
@strategy_options
@training_options
@click.option("--out", type=click.Path(), help="Run directory to create (config, masks, metrics, model.safetensors, summary.json).")
@click.option("--resume", type=click.Path(), help="Continue the interrupted run in this directory from its last finished epoch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory given by --out. Only a run "
              "directory of compress holding nothing but its own files is replaced; any other folder is refused.")
@click.option("--quiet", is_flag=True, help="No progress. Without it: a bar per epoch (and for SynFlow's rounds) on "
              "a terminal; elsewhere (CI, nohup, a scheduler's log) a line with the step, samples/s and ETA every "
              "30 s, or every COMPRESS_PROGRESS_SECONDS seconds.")
def train(config_file, out, resume, overwrite, quiet, **options):
    """Initialise from a seed, score, select, and train with the selection enforced."""
    from compress.run import train_from_options

    train_from_options(config_file, _overrides(options), out=out, resume=resume, overwrite=overwrite,
                       progress=not quiet)


@cli.command(epilog=DENSITY_HELP)
@selection_options
@strategy_options
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer plan as a JSON list of {layer, shape, "
              "total, trained, density, mode, kind} objects.")
def plan(config_file, as_json, **options):
    """Score and select, then print the per-layer table (weights, trained, density, mode) without training.

    For --method imp this is the plan of level 0."""
    from compress.run import plan_from_options

    click.echo(plan_from_options(config_file, _overrides(options), as_json=as_json))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Artifact file to write (e.g. runs/a.cpk).")
@click.option("--values", type=click.Choice(["fp16", "bf16", "fp32", "int8"]), default="fp16", show_default=True,
              help="Precision of the stored trained values and dense tensors; fp32 rebuilds the run bit-exactly; "
                   "int8 stores the trained values as 8-bit integers with one float32 scale per tensor (lossy, the "
                   "dense tensors in fp16): check its cost with --eval.")
@click.option("--eval", "evaluate", is_flag=True, help="Evaluate the packed model against the run's own on the run's "
              "test set and record both accuracies in the artifact (compress info shows them).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (without it, an existing file is never touched).")
@click.option("--level", type=int, help="For a run of levels (--method imp): the level to pack [default: the last].")
@click.option("--layout", type=click.Choice(["compact", "plain"]), default="compact", show_default=True,
              help="compact (format version 5): the values entropy-coded and the header compressed, the smallest "
                   "file; plain (versions 1 to 4): one safetensors tensor per stored tensor, about 30% larger, "
                   "readable tensor by tensor with any safetensors tool. Both load alike.")
def pack(run_dir, output, values, force, level, evaluate, layout):
    """Pack a finished run into one small artifact: trained values, coded masks, the seed.

    Frozen weights are not stored: they are regenerated from the 32-bit seed at load time and
    checked against a stored hash. Prints the storage report (see compress info). The file is
    written atomically with the permissions of your umask; an existing OUTPUT is replaced only with --force.
    """
    from compress.packing import pack_and_report

    click.echo(pack_and_report(run_dir, output, values, force, level, evaluate, layout))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info(artifact, as_json):
    """Show, per tensor and in total, what the artifact stores and what it saves against dense fp32."""
    from formats.report import info_text

    click.echo(info_text(artifact, as_json))


@cli.command(name="eval")
@click.argument("artifact", type=click.Path())
@click.option("--data", help="Data set to evaluate on [default: the one the run was trained on].")
@click.option("--data-root", help="Where the data set is looked for.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
def evaluate(artifact, data, data_root, batch_size, device):
    """Accuracy of a packed model on the test split of a data set."""
    from compress.packing import evaluate_artifact

    click.echo(evaluate_artifact(artifact, data, data_root, batch_size, device))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="ONNX file to write.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset version.")
@click.option("--fp16", is_flag=True, help="Store weights as float16 (Cast to float32 in the graph): half the file.")
@click.option("--sparse-initializers", is_flag=True,
              help="Store mostly-zero weights as COO sparse initializers where that is smaller (onnxruntime "
                   "densifies them at load: smaller file, same memory and speed).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run onnx.checker (full) and compare onnxruntime with PyTorch on random inputs; fail (exit 1, "
                   "nothing written) above 1e-4 x max(1, largest |output|). With --fp16 the fp16 graph is compared "
                   "with the verified fp32 graph, within 1e-2 x max(1, largest |output|): fp16 rounds each weight by "
                   "up to 4.9e-4 relative, after BatchNorm is folded into the convolutions.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (without it, an existing file is never touched).")
def export(artifact, output, opset, fp16, sparse_initializers, verify, force):
    """Export a packed artifact to ONNX with a dynamic batch dimension, for any ONNX runtime."""
    from formats.onnx_export import export_onnx

    click.echo(export_onnx(artifact, output, opset=opset, fp16=fp16, sparse_initializers=sparse_initializers,
                           verify=verify, force=force).text())


def _overrides(options: dict) -> dict:
    if options.get("density") is not None and options.get("sparsity") is not None:
        raise click.UsageError("give --density or --sparsity, not both (sparsity = 1 - density)")
    sparsity = options.pop("sparsity", None)
    if sparsity is not None:
        options["sparsity"] = sparsity
    return options


BUG_REPORT = ("this is a bug in compress, not a mistake of yours: please report it with the command you ran "
              "(set COMPRESS_DEBUG=1 to see the traceback)")


def _debug() -> bool:
    return os.environ.get("COMPRESS_DEBUG", "") not in ("", "0")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _terminate(signum, frame):
    """SIGTERM ends the command like Ctrl-C, so that temporary files are removed on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point. Exit 0 on success; 2 with one line for a user's mistake (``UserError``, bad options);
    1 for a failed ONNX verification or an unreadable/unwritable path; 1 with a request to report it for
    anything else, which is a bug (``COMPRESS_DEBUG=1`` shows its traceback); 130 when interrupted."""
    from formats.errors import UserError

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=argv, prog_name="compress", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted; a run continues from its last finished epoch with --resume RUN_DIR", err=True)
        return 130
    except click.ClickException as error:
        click.echo(f"error: {error.format_message()}", err=True)
        return 2
    except UserError as error:
        if _debug():
            raise
        click.echo(f"error: {_one_line(error)}", err=True)
        return 2
    except Exception as error:  # noqa: BLE001 - the last line of defence: classify, never hide
        if _debug():
            raise
        if type(error).__name__ == "ExportError":
            click.echo(f"error: {_one_line(error)}", err=True)
        elif isinstance(error, OSError):
            click.echo(f"error: {_one_line(error)}", err=True)
        else:
            click.echo(f"error: {type(error).__name__}: {_one_line(error)}\n{BUG_REPORT}", err=True)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
