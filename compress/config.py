"""The run configuration: one dataclass, loaded from YAML/TOML files and command-line overrides."""
from __future__ import annotations

from compress.errors import UserError
import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from compress.allocation import scope_of_allocation
from compress.data.loading import AUGMENTS
from formats.interspace import BASES
from compress.methods import METHODS
from formats.rng import check_seed
from compress.scores import SCORE_MODES, SCORES
from compress.selection import MODES, SCOPES, SELECTORS, check_density
from compress.training import TrainSettings

ON_COLLAPSE = ("warn", "error")
_WORDS = {2: "two", 3: "three"}

# Per-model training defaults, used for every field the user leaves unset.
_SMALL = {"epochs": 10, "batch_size": 128, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9,
          "schedule": "cosine", "weight_decay": 5e-4}
_CNN = {"epochs": 30, "batch_size": 128, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9,
        "schedule": "cosine", "weight_decay": 5e-4}
MODEL_DEFAULTS = {"lenet300": _SMALL, "lenet5": _SMALL, "vgg16": _CNN, "resnet20": {**_CNN, "weight_decay": 1e-4},
                  "resnet18": _CNN}
TV_DEFAULTS = {**_CNN, "lr": 0.05}

TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainSettings)]


@dataclass
class RunConfig:
    """Everything that decides a run; ``None`` means "the default for this model / method"."""

    model: str = "lenet5"
    data: str = "fashion-mnist"
    data_root: str | None = None
    data_shape: list[int] | None = None  # C, H, W for synthetic / imagefolder
    num_classes: int | None = None  # for synthetic / imagefolder
    subset: int | None = None
    val_split: float = 0.0
    method: str = "snip"
    score: str | None = None
    selector: str | None = None  # how scores become masks: topk, or cops (two scores); default: the method's
    scores: list[str] | None = None  # COPS: the two scores to combine
    gamma: float = 0.5  # COPS: fraction of the second score's best value the mask must keep
    mode: str | None = None
    density: float | None = None
    scope: str | None = None  # global, layer or erk (--allocation global|uniform|erk); default: the strategy's
    include_bias: bool = False
    interspace: bool = False  # interspace pruning: masks on coefficients over per-layer filter bases
    basis: str = "dct"  # the initial filter basis of interspace layers: dct or spatial
    fixed_basis: bool = False  # hold the basis at its initial value instead of training it
    basis_in_budget: bool = False  # count the trained basis entries inside the density (equal trained parameters)
    score_batches: int = 1
    score_batch_size: int = 100
    score_mode: str = "eval"  # the network's mode while SNIP/GraSP score it: eval (as the references) or train
    on_collapse: str = "warn"
    seed: int = 0
    device: str = "auto"
    world_size: int = 1  # processes that train the run together (torchrun); set from the environment
    workers: int = 0  # DataLoader processes that decode an image folder's batches (a runtime option)
    augment: str | None = None  # training augmentation: none or flip-crop (default: the data set's own)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    schedule: str | None = None
    step_size: int | None = None
    milestones: list[int] | None = None
    lr_decay: float | None = None
    weight_decay: float | None = None
    eval_every: int | None = None
    precision: str | None = None  # fp32, bf16 or fp16 (autocast; weights, masks and frozen values stay exact)
    engine: str | None = None  # dense, sparse or auto (compress.engine); part of the run, so a resume keeps it
    strategy_options: dict = field(default_factory=dict)  # the options of the method's strategy (--levels, ...)
    extras: dict = field(default_factory=dict)  # unused; kept so that config.json files that have it still load

    def resolved(self) -> "RunConfig":
        """A copy with every default filled in and every field validated."""
        from compress.strategies import STRATEGIES, build_options

        config = dataclasses.replace(self)
        method = METHODS.get(config.method)
        strategy = STRATEGIES.get(method.strategy)
        if method.strategy == "oneshot":
            if method.score is None and not method.scores:
                if config.density not in (None, 1.0):
                    raise UserError(f"method 'dense' trains every weight; drop --density/--sparsity ({config.density})")
                config.density = 1.0
            if config.density is None:
                raise UserError("give the fraction of weights to train: --density D or --sparsity S (= 1 - D)")
        if config.density is not None:
            config.density = check_density(config.density)
        config.selector = config.selector or method.selector
        selector = SELECTORS.get(config.selector)
        if isinstance(config.scores, str):
            config.scores = [name.strip() for name in config.scores.split(",") if name.strip()]
        if selector.arity > 1:
            if config.score is not None:
                raise UserError(f"--method {config.method} combines --scores A,B; drop --score")
            config.scores = list(config.scores or method.scores)
            if len(config.scores) != selector.arity:
                raise UserError(f"{config.selector} combines exactly {_WORDS.get(selector.arity, selector.arity)} scores "
                                f"(--scores A,B), got "
                                f"{len(config.scores)}: {','.join(config.scores)}")
            for name in config.scores:
                SCORES.get(name)
            selector.options(self.selector_options(config))
        else:
            if config.scores:
                raise UserError("--scores combines several scores; use it with --method cops")
            config.score = config.score or method.score
            if config.score is not None:
                SCORES.get(config.score)
        config.mode = config.mode or method.mode
        if config.mode not in MODES:
            raise UserError(f"unknown mode {config.mode!r}; known: {', '.join(MODES)}")
        config.scope = config.scope or strategy.default_scope
        if config.scope not in SCOPES:
            raise UserError(f"unknown scope {config.scope!r}; known: {', '.join(SCOPES)}")
        if config.on_collapse not in ON_COLLAPSE:
            raise UserError(f"unknown on-collapse {config.on_collapse!r}; known: {', '.join(ON_COLLAPSE)}")
        config.seed = check_seed(config.seed)
        if config.basis not in BASES:
            raise UserError(f"unknown basis {config.basis!r}; known: {', '.join(BASES)}")
        if not config.interspace and (config.basis != "dct" or config.fixed_basis or config.basis_in_budget):
            raise UserError("--basis, --fixed-basis and --basis-in-budget apply to interspace pruning; add --interspace")
        if config.basis_in_budget and config.fixed_basis:
            raise UserError("--basis-in-budget counts the trained bases inside the density, but --fixed-basis trains "
                            "none: drop one of them")
        if config.basis_in_budget and strategy.multilevel:
            raise UserError("--basis-in-budget applies to at-init and dynamic methods; a lottery run's levels prune "
                            "by magnitude to their own targets")
        if config.augment is not None and config.augment not in AUGMENTS:
            raise UserError(f"unknown augmentation {config.augment!r}; known: {', '.join(AUGMENTS)}")
        if isinstance(config.workers, bool) or not isinstance(config.workers, int) or config.workers < 0:
            raise UserError(f"workers must be a non-negative integer, got {config.workers!r}")
        if config.score_mode not in SCORE_MODES:
            raise UserError(f"unknown score mode {config.score_mode!r}; known: {', '.join(SCORE_MODES)}")
        for name in ("score_batches", "score_batch_size"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if config.subset is not None and (not isinstance(config.subset, int) or config.subset < 1):
            raise UserError(f"subset must be a positive integer, got {config.subset!r}")
        if not (isinstance(config.val_split, (int, float)) and 0 <= config.val_split < 1):
            raise UserError(f"val-split must be in [0, 1), got {config.val_split!r}")
        if config.data_root is not None and not Path(config.data_root).is_dir():
            raise UserError(
                f"data root {config.data_root} does not exist; create it, point --data-root at the folder that "
                "holds the data set, or leave it out to use the default cache"
            )
        if config.device not in ("auto", "cpu") and not config.device.startswith("cuda"):
            raise UserError(f"unknown device {config.device!r}; use auto, cpu or cuda[:N]")
        defaults = MODEL_DEFAULTS.get(config.model, TV_DEFAULTS)
        base = TrainSettings()
        for name in TRAIN_FIELDS:
            if getattr(config, name) is None:
                setattr(config, name, defaults.get(name, getattr(base, name)))
        config.train_settings().validate()
        if isinstance(config.world_size, bool) or not isinstance(config.world_size, int) or config.world_size < 1:
            raise UserError(f"world_size must be a positive integer, got {config.world_size!r}")
        if config.batch_size < config.world_size:
            raise UserError(f"--batch-size {config.batch_size} is the global batch, shared by the {config.world_size} "
                            "processes: give at least one sample per process")
        if not isinstance(config.strategy_options, dict):
            raise UserError(f"strategy options must be a mapping of option names to values, got {config.strategy_options!r}")
        options = build_options(method.strategy, config.strategy_options)
        strategy.check(config, options)
        config.strategy_options = dataclasses.asdict(options)
        return config

    @staticmethod
    def selector_options(config: "RunConfig") -> dict:
        """The options of the config's selector (COPS: gamma)."""
        return {"gamma": config.gamma} if "gamma" in SELECTORS.get(config.selector).defaults else {}

    def score_names(self) -> list[str]:
        """The at-init scores the selector combines: ``[score]``, the ``scores`` of COPS, or none."""
        return list(self.scores) if self.scores else ([self.score] if self.score is not None else [])

    @property
    def strategy(self) -> str:
        """The registered strategy of the method: who owns the masks over time."""
        return METHODS.get(self.method).strategy

    def strategy_settings(self):
        """The strategy's options dataclass (resolve the config first)."""
        from compress.strategies import build_options

        return build_options(self.strategy, self.strategy_options)

    def train_settings(self) -> TrainSettings:
        return TrainSettings(**{name: getattr(self, name) for name in TRAIN_FIELDS})

    @property
    def sparsity(self) -> float | None:
        return None if self.density is None else 1.0 - self.density

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CONFIG_FIELDS = [f.name for f in dataclasses.fields(RunConfig)]
CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}


# Keys added after run directories were first written, with the value those runs had: a stored config.json
# without one describes a run made that way (before --score-mode, SNIP and GraSP scored in train mode; before
# --engine, every run trained on the dense engine).
STORED_RUN_DEFAULTS = {"score_mode": "train", "engine": "dense"}


def stored_run_config(values: dict, source: str = "config") -> RunConfig:
    """The RunConfig of a run directory's config.json (see STORED_RUN_DEFAULTS)."""
    return config_from_dict({**STORED_RUN_DEFAULTS, **values}, source)


def config_from_dict(values: dict, source: str = "config") -> RunConfig:
    """Build a RunConfig from a dict whose keys may use dashes; ``sparsity`` is turned into density."""
    from compress.strategies import all_option_names

    strategy_keys = all_option_names()
    clean: dict = {}
    strategy_options = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in strategy_keys:
            strategy_options[name] = value
            continue
        if name not in CONFIG_FIELDS + ["sparsity", "allocation"]:
            known = sorted(CONFIG_FIELDS + ["sparsity", "allocation"] + list(strategy_keys))
            raise UserError(f"{source}: unknown key {key!r}; known: {', '.join(known)}")
        clean[name] = value
    if strategy_options:
        if not isinstance(clean.get("strategy_options", {}), dict):
            raise UserError(f"{source}: strategy_options must be a mapping")
        clean["strategy_options"] = {**clean.get("strategy_options", {}), **strategy_options}
    if "allocation" in clean:
        scope = scope_of_allocation(clean.pop("allocation"))
        if clean.get("scope") not in (None, scope):
            raise UserError(f"{source}: --allocation and --scope disagree ({scope} against {clean['scope']}); give one")
        clean["scope"] = scope
    if clean.get("score") == "cops":  # config.json of earlier versions: COPS was a pseudo-score
        clean["score"] = None
        clean.setdefault("selector", "cops")
    if "sparsity" in clean:
        if clean.get("density") is not None:
            raise UserError(f"{source}: give density or sparsity, not both")
        sparsity = clean.pop("sparsity")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise UserError(f"{source}: sparsity must be in [0, 1) (the fraction of weights not trained), got {sparsity!r}")
        clean["density"] = 1.0 - float(sparsity)
    if isinstance(clean.get("data_shape"), str):
        clean["data_shape"] = parse_shape(clean["data_shape"])
    return RunConfig(**clean)


def parse_shape(text: str) -> list[int]:
    """'3x32x32' -> [3, 32, 32]."""
    parts = str(text).lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"data shape must look like CxHxW with positive integers (e.g. 3x32x32), got {text!r}")
    return [int(p) for p in parts]


def read_config_file(path: str | Path) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise UserError(f"config file {path} is not valid TOML: {error}") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise UserError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    else:
        raise UserError(f"config file {path} must end in .yaml, .yml or .toml")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    return values


def build_config(config_file: str | None, overrides: dict) -> RunConfig:
    """File values first, then command-line overrides (``None`` values are ignored); not yet resolved."""
    values = read_config_file(config_file) if config_file else {}
    cleaned_overrides = {k: v for k, v in overrides.items() if v is not None}
    if any(k in cleaned_overrides for k in ("density", "sparsity")):
        values = {k: v for k, v in values.items() if str(k) not in ("density", "sparsity")}
    if any(k in cleaned_overrides for k in ("scope", "allocation")):
        values = {k: v for k, v in values.items() if str(k) not in ("scope", "allocation")}
    values.update(cleaned_overrides)
    return config_from_dict(values, source=str(config_file) if config_file else "options")

