"""Configuration: attrs classes with RustGPT's defaults, and ``load_config`` layering them:
defaults < config file (TOML; YAML with PyYAML) < environment ``LLM_<SECTION>_<KEY>`` < CLI.

Every value is checked where it enters; errors name the source, the key, the value and the
rule. Imports nothing heavy: ``rustgpt-cli config show`` must start fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import attrs

from rustgpt.errors import ArchitectureError, ConfigError
from rustgpt.fileio import read_bytes
from rustgpt.resources import max_threads, threads_bound_text

ENV_PREFIX = "LLM_"


def _help(text: str, **kwargs):
    """attrs.field with a one-line description (shown in config files and --help)."""
    return attrs.field(metadata={"help": text}, **kwargs)


def _check(rule: str, ok) -> Any:
    def validate(instance, attribute, value):
        if value is not None and not ok(value):
            section = SECTIONS_BY_CLASS[type(instance)]
            raise ConfigError(f"[{section}] {attribute.name} = {value!r}, expected {rule}")
    return validate


_positive = _check("> 0", lambda v: v > 0)
_non_negative = _check(">= 0", lambda v: v >= 0)
_fraction = _check("in [0, 1)", lambda v: 0 <= v < 1)
_precision = _check("fp32, bf16 or auto", lambda v: v in ("fp32", "bf16", "auto"))


# The architectures [model] arch names: the values they give the architecture keys left
# unset. Each also picks its init (rustgpt: DESIGN.md's; gpt: nanoGPT's, see rustgpt.model).
ARCHITECTURES = {
    "rustgpt": {"norm": "post", "activation": "relu", "attention_projection": False,
                "tie_embeddings": False, "bias": True},
    "gpt": {"norm": "pre", "activation": "gelu", "attention_projection": True,
            "tie_embeddings": True, "bias": False},  # nanoGPT's GPT-2 block
}


@attrs.frozen
class ModelConfig:
    """[model]: the network's sizes and architecture (RustGPT's by default). ``arch`` names
    an architecture: the values of norm, activation, attention_projection, tie_embeddings
    and bias left unset (None) and the init; keys given explicitly win (dropout is no
    architecture's, 0 unless given). Once built, every
    key holds its value (None is resolved), so a saved config reads the same whatever the
    architectures' defaults become. Raises ArchitectureError when num_heads does not divide
    embedding_dim, ConfigError for a size below 1 or an unknown choice."""

    embedding_dim: int = _help("width of token vectors (D)", default=128, validator=_positive)
    hidden_dim: int = _help("feed-forward width (H)", default=256, validator=_positive)
    num_layers: int = _help("transformer blocks", default=3, validator=_positive)
    num_heads: int = _help("attention heads; must divide embedding_dim", default=1,
                           validator=_positive)
    max_seq_len: int = _help("longest sequence the model reads (context)", default=80,
                             validator=_positive)
    arch: str = _help("rustgpt (RustGPT's block and init) or gpt (nanoGPT's GPT-2 block and "
                      "init): the values of the next five keys where they are unset",
                      default="rustgpt",
                      validator=_check(" or ".join(ARCHITECTURES), lambda v: v in ARCHITECTURES))
    norm: Optional[str] = _help("post: x = LN(x + f(x)) (rustgpt); pre: x = x + f(LN(x)) and a "
                                "final LN (gpt)", default=None,
                                validator=_check("post or pre", lambda v: v in ("post", "pre")))
    activation: Optional[str] = _help("feed-forward activation: relu (rustgpt) or gelu, exact "
                                      "erf form (gpt)", default=None,
                                      validator=_check("relu or gelu",
                                                       lambda v: v in ("relu", "gelu")))
    attention_projection: Optional[bool] = _help("an output projection (D x D) after "
                                                 "attention (gpt)", default=None)
    tie_embeddings: Optional[bool] = _help("the output layer is the token embedding "
                                           "transposed, no weight of its own (gpt)",
                                           default=None)
    bias: Optional[bool] = _help("biases in the feed-forward, attention-output and output "
                                 "layers and layer norms (rustgpt)", default=None)
    dropout: float = _help("training only: drop this fraction of the embeddings' and each "
                           "sub-layer's outputs (before the residual add), scaling the rest "
                           "by 1 / (1 - dropout); 0 = off", default=0.0, validator=_fraction)

    def __attrs_post_init__(self) -> None:
        if self.embedding_dim % self.num_heads:
            raise ArchitectureError(f"[model] num_heads = {self.num_heads} must divide "
                                    f"embedding_dim = {self.embedding_dim}")
        for key, value in ARCHITECTURES[self.arch].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)  # frozen: set once, while building


@attrs.frozen
class TrainingConfig:
    """[training]: RustGPT's two phases (epochs, learning rates), batching, Adam, the
    schedule, clipping, seed and threads."""

    pretraining_epochs: int = _help("epochs over the pretraining data", default=100,
                                    validator=_non_negative)
    pretraining_lr: float = _help("Adam learning rate while pretraining", default=5e-4,
                                  validator=_positive)
    instruction_epochs: int = _help("epochs over the chat data", default=100,
                                    validator=_non_negative)
    instruction_lr: float = _help("Adam learning rate while instruction tuning", default=1e-4,
                                  validator=_positive)
    batch_size: int = _help("examples per step (padded on the right)", default=1,
                            validator=_positive)
    max_grad_norm: float = _help("clip gradients to this global L2 norm", default=5.0,
                                 validator=_positive)
    beta1: float = _help("Adam beta1", default=0.9, validator=_fraction)
    beta2: float = _help("Adam beta2", default=0.999, validator=_fraction)
    eps: float = _help("Adam epsilon", default=1e-8, validator=_positive)
    weight_decay: float = _help("AdamW decoupled weight decay of the weight matrices and "
                                "embeddings, not biases or norms (0 = Adam)", default=0.0,
                                validator=_non_negative)
    schedule: str = _help("learning-rate schedule: constant, or cosine (warmup then decay "
                          "to 10%)", default="constant",
                          validator=_check("constant or cosine", lambda v: v in ("constant", "cosine")))
    warmup_steps: int = _help("linear warmup steps per phase (cosine schedule)", default=0,
                              validator=_non_negative)
    shuffle: bool = _help("shuffle examples every epoch (RustGPT keeps file order)",
                          default=False)
    max_iters: int = _help("text corpora: training steps (each of grad_accum batches of "
                           "random windows)", default=5000, validator=_positive)
    grad_accum: int = _help("text corpora: batches whose gradients make one step",
                            default=1, validator=_positive)
    eval_interval: int = _help("text corpora: estimate train and val loss (and save a "
                               "checkpoint) every N steps", default=250, validator=_positive)
    eval_iters: int = _help("text corpora: batches per loss estimate", default=20,
                            validator=_positive)
    seed: int = _help("seed of the weights and the shuffling", default=42,
                      validator=_non_negative)
    threads: int = _help("kernel threads; 0 = OMP_NUM_THREADS or the physical cores",
                         default=0, validator=_check(
                             f"between 0 and {threads_bound_text()}",
                             lambda v: 0 <= v <= max_threads()))
    adaptive_threads: bool = _help("run steps on one thread while that measures faster "
                                   "than all (a busy shared VM); same results", default=True)
    precision: str = _help("matmuls in fp32, or bf16 (float32 sums and master weights); "
                           "auto = bf16 where the CPU has AMX or AVX512-BF16", default="fp32",
                           validator=_precision)


@attrs.frozen
class DataConfig:
    """[data]: the example files of the two phases, the size limit, long examples; or text
    corpora, their tokenizer, the validation share and where token files are cached."""

    text: tuple[str, ...] = _help("text corpora to train on instead of the example files: "
                                  ".txt/.md files, directories, globs, .jsonl with a \"text\" "
                                  "field", default=())
    tokenizer: str = _help("text corpora: char, bpe (trained on the corpus) or the path of "
                           "a tokenizer file (a Hugging Face tokenizer.json)", default="char")
    vocab_size: int = _help("text corpora, bpe: the vocabulary size to train", default=1024,
                            validator=_check(">= 257", lambda v: v >= 257))
    pretraining_data: str = _help("pretraining examples, .json or .csv; empty = bundled",
                                  default="")
    chat_training_data: str = _help("instruction-tuning examples, .json or .csv; empty = "
                                    "bundled", default="")
    max_file_mb: int = _help("refuse data files larger than this", default=256,
                             validator=_positive)
    long_examples: str = _help("examples longer than the context: truncate, or split into "
                               "windows", default="truncate",
                               validator=_check("truncate or split",
                                                lambda v: v in ("truncate", "split")))
    val_fraction: float = _help("text corpora: the last share of the tokens kept for "
                                "validation", default=0.1, validator=_fraction)
    token_cache: str = _help("text corpora: directory of the token files (reused while "
                             "corpus and tokenizer are unchanged); empty = "
                             "$XDG_CACHE_HOME/rustgpt or ~/.cache/rustgpt", default="")


@attrs.frozen
class GenerationConfig:
    """[generation]: decoding settings (greedy by default, as RustGPT)."""

    max_tokens: Optional[int] = _help("new tokens at most (--max-new-tokens); unset = 80 for "
                                      "a chat-tuned model (word tokenizer), 256 for a model "
                                      "trained on text", default=None, validator=_positive)
    temperature: float = _help("0 = greedy (RustGPT), > 0 samples", default=0.0,
                               validator=_non_negative)
    top_k: int = _help("sample among the k likeliest tokens; 0 = off", default=0,
                       validator=_non_negative)
    top_p: float = _help("nucleus sampling mass, in (0, 1]", default=1.0,
                         validator=_check("in (0, 1]", lambda v: 0 < v <= 1))
    min_p: float = _help("drop tokens below min_p * the top probability", default=0.0,
                         validator=_fraction)
    repetition_penalty: float = _help("> 1 discourages repeating tokens", default=1.0,
                                      validator=_positive)
    beam_width: int = _help("beams; 1 = no beam search", default=1, validator=_positive)
    seed: Optional[int] = _help("sampling seed; unset = random", default=None,
                                validator=_non_negative)
    precision: str = _help("matmuls in fp32, or bf16 from a bf16 copy of the weights; auto = "
                           "bf16 where the CPU has AMX or AVX512-BF16", default="fp32",
                           validator=_precision)


@attrs.frozen
class LoggingConfig:
    """[logging]: level, text or JSON lines, a log file, TensorBoard."""

    level: str = _help("DEBUG, INFO, WARNING or ERROR", default="INFO",
                       validator=_check("DEBUG, INFO, WARNING or ERROR",
                                        lambda v: v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR")))
    format: str = _help("text or json (one JSON object per line)", default="text",
                        validator=_check("text or json", lambda v: v in ("text", "json")))
    file: str = _help("log to this file instead of stderr; empty = stderr", default="")
    tensorboard: str = _help("also write TensorBoard event files here (needs the "
                             "tensorboard extra); empty = off", default="")


@attrs.frozen
class CheckpointConfig:
    """[checkpoint]: where checkpoints go, how many are kept, how often."""

    directory: str = _help("where checkpoints are written", default="checkpoints")
    max_to_keep: int = _help("newest checkpoints kept (best is kept apart)", default=5,
                             validator=_positive)
    keep_best: bool = _help("also keep the lowest-loss checkpoint of the latest phase",
                            default=True)
    every_epochs: int = _help("save every N epochs (and at the end of each phase)",
                              default=10, validator=_positive)


@attrs.frozen
class Config:
    """The whole configuration, one attribute per section; see ``load_config``."""

    model: ModelConfig = attrs.field(factory=ModelConfig)
    training: TrainingConfig = attrs.field(factory=TrainingConfig)
    data: DataConfig = attrs.field(factory=DataConfig)
    generation: GenerationConfig = attrs.field(factory=GenerationConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    checkpoint: CheckpointConfig = attrs.field(factory=CheckpointConfig)


SECTIONS = {f.name: f.default.factory for f in attrs.fields(Config)}
SECTIONS_BY_CLASS = {cls: name for name, cls in SECTIONS.items()}
# the annotations are strings (from __future__; cattrs may resolve them in place later);
# their types without typing.get_type_hints, which costs more start-up time than the rest
_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "Optional[int]": Optional[int],
          "Optional[str]": Optional[str], "Optional[bool]": Optional[bool],
          "tuple[str, ...]": tuple[str, ...]}
_PATHS = tuple[str, ...]  # a list of paths: in the environment, separated by os.pathsep
_OPTIONAL = {Optional[int]: int, Optional[str]: str, Optional[bool]: bool}  # -> the base type


def to_dict(config: Config) -> dict:
    """Plain nested dict of a Config (JSON and TOML friendly, None kept)."""
    import cattrs  # not at module level: `rustgpt-cli config show` must start fast

    return cattrs.Converter().unstructure(config)


def from_dict(data: Mapping, source: str = "config") -> Config:
    """A Config from a nested dict, strictly checked (see ``load_config``): unlike cattrs'
    default structuring, 1.5 is not silently accepted as the integer 1."""
    merged, _ = _merge({}, {}, data, source)
    return _build(merged)


# ---- layering ------------------------------------------------------------------------------

def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            Optional[int]: "an integer or nothing", Optional[str]: "a string or nothing",
            Optional[bool]: "true, false or nothing", _PATHS: "a list of strings"}[tp]


def _coerce(value: Any, tp, where: str, from_text: bool) -> Any:
    """`value` as type `tp`; strings are parsed when they come from the environment."""
    if tp == _PATHS:
        if from_text:
            return tuple(p for p in value.split(os.pathsep) if p)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} = {value!r}, expected {_type_name(tp)}")
        return tuple(value)
    optional = tp in _OPTIONAL
    base = _OPTIONAL.get(tp, tp)
    if from_text:
        text = value.strip()
        try:
            if optional and text.lower() in ("", "none", "null"):
                return None
            if base is bool:
                lowered = text.lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return base(text)
        except ValueError:
            raise ConfigError(f"{where} = {value!r}, expected {_type_name(tp)}") from None
    if value is None and optional:
        return None
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
          isinstance(value, int) and not isinstance(value, bool) if base is int else
          isinstance(value, str))
    if not ok:
        raise ConfigError(f"{where} = {value!r}, expected {_type_name(tp)}")
    return float(value) if base is float else value


def _merge(values: dict, sources: dict, layer: Mapping, source: str,
           from_text: bool = False) -> tuple[dict, dict]:
    """Lay `layer` ({section: {key: value}}) over `values`, recording each key's source."""
    if not isinstance(layer, Mapping):
        raise ConfigError(f"{source}: expected a table of sections, found {type(layer).__name__}")
    for section, table in layer.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}], expected one of "
                              f"{', '.join(SECTIONS)}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: [{section}] must be a table of settings")
        fields = {f.name: f for f in attrs.fields(SECTIONS[section])}
        for key, value in table.items():
            if key not in fields:
                raise ConfigError(f"{source}: unknown key [{section}] {key}, expected one of "
                                  f"{', '.join(fields)}")
            where = f"{source}: [{section}] {key}"
            tp = _TYPES.get(fields[key].type, fields[key].type)
            values.setdefault(section, {})[key] = _coerce(value, tp, where, from_text)
            sources[f"{section}.{key}"] = source
    return values, sources


def _build(values: dict, sources: Mapping[str, str] | None = None) -> Config:
    """Config from merged values; a rule broken by a value names where the value came from."""
    sections = {}
    for name, cls in SECTIONS.items():
        try:
            sections[name] = cls(**values.get(name, {}))
        except ConfigError as err:
            culprits = [src for key, src in (sources or {}).items()
                        if key.startswith(name + ".") and f"{key.split('.')[1]} =" in str(err)]
            if culprits:
                raise type(err)(f"{culprits[0]}: {err}") from None
            raise
    return Config(**sections)


def read_file(path: str | os.PathLike) -> dict:
    """The nested dict of a TOML (or, with PyYAML, YAML) config file."""
    path = Path(path)
    raw = read_bytes(path, ConfigError)
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: YAML config needs PyYAML: pip install "
                              f"'rustgpt[yaml]'") from None
        try:
            data = yaml.safe_load(raw) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: malformed YAML ({err})".replace("\n", " ")) from err
        return data
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: malformed TOML ({err})") from err


def env_layer(environ: Mapping[str, str]) -> tuple[dict, dict]:
    """{section: {key: text}} of the LLM_<SECTION>_<KEY> variables, and their names.
    Variables whose <SECTION> is not ours are left alone (other tools use LLM_ too)."""
    layer: dict = {}
    names: dict = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section in SECTIONS:
            layer.setdefault(section, {})[key] = value
            names[f"{section}.{key}"] = name
    return layer, names


def load_config(file: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None,
                overrides: Mapping | None = None) -> tuple[Config, dict[str, str]]:
    """The merged Config and, for each "section.key" set above its default, where it came
    from ("file PATH", "env LLM_...", "command line"). Raises ConfigError on any bad value."""
    values: dict = {}
    sources: dict = {}
    if file is not None:
        _merge(values, sources, read_file(file), f"{file}")
        for key in list(sources):
            sources[key] = f"file {file}"
    layer, names = env_layer(os.environ if environ is None else environ)
    for section, table in layer.items():
        for key, text in table.items():
            _merge(values, sources, {section: {key: text}}, f"env {names[f'{section}.{key}']}",
                   from_text=True)
    if overrides:
        given = {s: {k: v for k, v in t.items() if v is not None} for s, t in overrides.items()}
        _merge(values, sources, given, "command line")
    return _build(values, sources), sources


# ---- documents: config.example.toml, .env.example, `config show` ----------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    return repr(value)


def render_toml(config: Config | None = None, sources: Mapping[str, str] | None = None) -> str:
    """A TOML document of `config` (defaults when None), each key with its help as a comment,
    or with its source when `sources` is given. Keys whose default is unset (None) and that
    no source set are commented out while they hold what they get unset (an architecture
    key written into the file would keep its value when the file's arch changes)."""
    config = config or Config()
    lines = ["# rustgpt configuration. Precedence: defaults < this file < LLM_* environment "
             "< command-line options."]
    for section, cls in SECTIONS.items():
        lines += ["", f"[{section}]"]
        current, defaults = getattr(config, section), cls()
        for f in attrs.fields(cls):
            value, key = getattr(current, f.name), f"{section}.{f.name}"
            resolved = f.default is None and value is not None  # unset, then given a value
            note = (f.metadata["help"] if sources is None else
                    sources.get(key, "unset: set by arch" if resolved else "default"))
            entry = f"{f.name} = {_toml_value(value)}" if value is not None else f"# {f.name} ="
            if resolved and key not in (sources or {}) and value == getattr(defaults, f.name):
                entry = "# " + entry
            lines.append(f"{entry:<40} # {note}")
    return "\n".join(lines) + "\n"


def render_env() -> str:
    """The .env.example document: every setting as an LLM_* variable with its default."""
    lines = ["# rustgpt settings as environment variables (override the config file)."]
    for section, cls in SECTIONS.items():
        lines.append("")
        for f in attrs.fields(cls):
            name = f"{ENV_PREFIX}{section}_{f.name}".upper()
            value = f.default
            text = ("" if value is None else str(value).lower() if isinstance(value, bool) else
                    os.pathsep.join(value) if isinstance(value, tuple) else str(value))
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"{name}={text}")
    return "\n".join(lines) + "\n"
