"""Configuration: defaults, precedence (file < env < CLI), validation messages, documents."""

from pathlib import Path

import pytest

from rustgpt.config import (
    Config, from_dict, load_config, render_env, render_toml, to_dict)
from rustgpt.errors import ArchitectureError, ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_rustgpts():
    c = Config()
    assert (c.model.embedding_dim, c.model.hidden_dim, c.model.num_layers, c.model.num_heads,
            c.model.max_seq_len) == (128, 256, 3, 1, 80)
    t = c.training
    assert (t.pretraining_epochs, t.pretraining_lr, t.instruction_epochs, t.instruction_lr,
            t.batch_size, t.max_grad_norm) == (100, 5e-4, 100, 1e-4, 1, 5.0)
    assert c.generation.temperature == 0.0 and c.generation.beam_width == 1


def test_precedence_file_env_cli(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[training]\npretraining_lr = 0.002\nbatch_size = 4\n"
                    "[model]\nhidden_dim = 64\n")
    env = {"LLM_TRAINING_PRETRAINING_LR": "0.001", "LLM_TRAINING_SHUFFLE": "true",
           "LLM_OTHER_THING": "ignored", "PATH": "/bin"}
    config, sources = load_config(path, env, {"training": {"batch_size": 8, "seed": None}})
    assert config.training.pretraining_lr == 0.001 and config.training.shuffle is True
    assert config.training.batch_size == 8 and config.model.hidden_dim == 64
    assert config.training.seed == 42  # None from the CLI means "not given"
    assert sources == {"training.pretraining_lr": "env LLM_TRAINING_PRETRAINING_LR",
                       "training.batch_size": "command line", "model.hidden_dim": f"file {path}",
                       "training.shuffle": "env LLM_TRAINING_SHUFFLE"}


@pytest.mark.parametrize("toml,message", [
    ("[model]\nembeding_dim = 3\n", r"unknown key \[model\] embeding_dim, expected one of"),
    ("[modle]\n", r"unknown section \[modle\]"),
    ("[model]\nembedding_dim = \"big\"\n", r"\[model\] embedding_dim = 'big', expected an integer"),
    ("[model]\nembedding_dim = 1.5\n", r"embedding_dim = 1.5, expected an integer"),
    ("[model]\nnum_layers = 0\n", r"\[model\] num_layers = 0, expected > 0"),
    ("[training]\npretraining_lr = -1\n", r"pretraining_lr = -1.0, expected > 0"),
    ("[training]\nshuffle = 1\n", r"shuffle = 1, expected true or false"),
    ("[generation]\ntop_p = 1.5\n", r"top_p = 1.5, expected in \(0, 1\]"),
    ("[model\n", "malformed TOML"),
])
def test_bad_files(tmp_path, toml, message):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path, {})


def test_heads_must_divide_embedding_and_env_errors_name_the_variable():
    with pytest.raises(ArchitectureError, match=r"env LLM_MODEL_NUM_HEADS: \[model\] num_heads "
                                                r"= 3 must divide embedding_dim = 128"):
        load_config(None, {"LLM_MODEL_NUM_HEADS": "3"})
    with pytest.raises(ConfigError, match=r"env LLM_MODEL_EMBEDDING_DIM: \[model\] "
                                          r"embedding_dim = 'x', expected an integer"):
        load_config(None, {"LLM_MODEL_EMBEDDING_DIM": "x"})
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, {"LLM_MODEL_COLOUR": "red"})
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(None, {"LLM_TRAINING_SHUFFLE": "maybe"})


def test_arch_sets_the_architecture_keys_left_unset():
    """[model] arch gives norm, activation, attention_projection, tie_embeddings and bias
    their values where the file, environment or command line leave them unset; keys given
    win; the resolved config round-trips and its document comments the arch's keys out."""
    assert Config().model.arch == "rustgpt"
    m = Config().model
    assert (m.norm, m.activation, m.attention_projection, m.tie_embeddings, m.bias) == (
        "post", "relu", False, False, True)
    config, sources = load_config(None, {"LLM_MODEL_ARCH": "gpt", "LLM_MODEL_NORM": ""},
                                  {"model": {"bias": True, "activation": None}})
    m = config.model
    assert (m.arch, m.norm, m.activation, m.attention_projection, m.tie_embeddings, m.bias) == (
        "gpt", "pre", "gelu", True, True, True)
    assert sources["model.bias"] == "command line" and "model.activation" not in sources
    assert from_dict(to_dict(config)) == config
    assert '# norm = "post"' in render_toml() and 'arch = "rustgpt"' in render_toml()
    assert 'norm = "pre"  ' in render_toml(config)  # not the default: written out


@pytest.mark.parametrize("toml,message", [
    ('arch = "llama"', r"\[model\] arch = 'llama', expected rustgpt or gpt"),
    ('norm = "sandwich"', r"\[model\] norm = 'sandwich', expected post or pre"),
    ('activation = "swish"', r"\[model\] activation = 'swish', expected relu or gelu"),
    ("bias = 1", r"\[model\] bias = 1, expected true, false or nothing"),
    ("tie_embeddings = \"yes\"", r"tie_embeddings = 'yes', expected true, false or nothing"),
    ("dropout = 1", r"\[model\] dropout = 1.0, expected in \[0, 1\)"),
    ("dropout = -0.1", r"\[model\] dropout = -0.1, expected in \[0, 1\)"),
])
def test_bad_architecture_keys(tmp_path, toml, message):
    path = tmp_path / "c.toml"
    path.write_text(f"[model]\n{toml}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, {})


def test_unreadable_file_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml: no such file"):
        load_config(tmp_path / "missing.toml", {})
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 2\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"needs PyYAML: pip install 'rustgpt\[yaml\]'"):
            load_config(path, {})
    else:
        assert load_config(path, {})[0].model.num_layers == 2


def test_dict_round_trip():
    config = load_config(None, {"LLM_GENERATION_SEED": "7"})[0]
    assert from_dict(to_dict(config)) == config
    assert to_dict(Config())["generation"]["seed"] is None


def test_example_files_match_the_defaults():
    # regenerate with: python -c "from rustgpt.config import *; print(render_toml(), end='')"
    assert (ROOT / "config.example.toml").read_text() == render_toml()
    assert (ROOT / ".env.example").read_text() == render_env()


def test_rendered_toml_loads_back_to_the_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(render_toml())
    assert load_config(path, {})[0] == Config()
    env = dict(line.split("=", 1) for line in render_env().splitlines()
               if line and not line.startswith("#"))
    assert load_config(None, env)[0] == Config()


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

values = st.one_of(st.integers(-5, 300), st.floats(allow_nan=True), st.booleans(), st.text(max_size=8),
                   st.none(), st.lists(st.integers(), max_size=2))
keys = st.sampled_from(["embedding_dim", "num_heads", "pretraining_lr", "shuffle", "top_p",
                        "level", "directory", "seed", "bogus"])
sections = st.sampled_from(["model", "training", "generation", "logging", "checkpoint", "nope"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(sections, st.dictionaries(keys, values, max_size=3), max_size=3))
def test_any_structure_gives_a_config_or_a_config_error(data):
    try:
        config = from_dict(data)
    except ConfigError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(config, Config)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["LLM_MODEL_EMBEDDING_DIM", "LLM_TRAINING_PRETRAINING_LR",
                        "LLM_TRAINING_SHUFFLE", "LLM_GENERATION_SEED", "LLM_LOGGING_LEVEL"]),
       st.text(max_size=10))
def test_any_environment_value_gives_a_config_or_a_config_error(name, value):
    try:
        load_config(None, {name: value})
    except ConfigError as err:
        assert name in str(err)
