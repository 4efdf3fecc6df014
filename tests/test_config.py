"""Settings: TrainConfig holds a GPTConfig; both validate naming field and value; the command
line is generated from them (help and default for every flag), reads --config files, writes the
resolved config beside the checkpoint, and reads the checkpoint once on --resume."""

import json
import typing
from dataclasses import fields

import pytest

from minigpt import checkpoint as checkpoint_module
from minigpt.attention import BACKENDS
from minigpt.config import ConfigError, GPTConfig
from minigpt.train.config import PRESETS, TrainConfig, default_settings, fixed_on_resume
from minigpt.cli.train import _NOT_FLAGS, build_parser, main, resolve_config


@pytest.mark.parametrize("kw, owner, name", [
    (dict(batch_size=0), "TrainConfig", "batch_size"),
    (dict(learning_rate=-1.0), "TrainConfig", "learning_rate"),
    (dict(min_lr=1.0, learning_rate=0.1), "TrainConfig", "min_lr"),
    (dict(beta2=1.0), "TrainConfig", "beta2"),
    (dict(tokenizer="words"), "TrainConfig", "tokenizer"),
    (dict(dtype="fp8"), "TrainConfig", "dtype"),
    (dict(lr_decay_iters=0), "TrainConfig", "lr_decay_iters"),
    (dict(n_embd=30, n_head=4), "GPTConfig", "n_embd"),
    (dict(dropout=1.5), "GPTConfig", "dropout"),
])
def test_errors_name_the_field_and_the_value(kw, owner, name):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**kw)
    e = info.value
    assert (e.owner, e.name) == (owner, name) and e.value == kw[name]
    assert str(e).startswith(f"{owner}.{name} ") and repr(kw[name]) in str(e)
    assert "--" not in str(e)  # a library error names fields, not flags


def test_flat_model_fields_nested_dicts_and_old_checkpoints_agree():
    flat = TrainConfig(n_layer=2, n_head=2, n_embd=32, batch_size=4)
    nested = TrainConfig.from_dict({"model": {"n_layer": 2, "n_head": 2, "n_embd": 32},
                                    "batch_size": 4})
    legacy = TrainConfig.from_dict({"n_layer": 2, "n_head": 2, "n_embd": 32, "batch_size": 4,
                                    "gone_setting": 1}, strict=False)
    assert flat == nested == legacy and flat.model.block_size == 256
    assert TrainConfig.from_dict(flat.to_dict()) == flat
    with pytest.raises(ConfigError, match="TrainConfig.gone_setting is not a setting"):
        TrainConfig.from_dict({"gone_setting": 1})
    with pytest.raises(TypeError, match="not both"):
        TrainConfig(model=GPTConfig(), n_layer=2)


def test_presets_are_overrides_of_fields():
    assert PRESETS["shakespeare_char"] == {}
    names = {f.name for f in fields(TrainConfig)}
    model_names = {f.name for f in fields(GPTConfig)}
    for preset in PRESETS.values():
        assert set(preset) <= names
        assert set(preset.get("model", {})) <= model_names
    gpu, _ = resolve_config(["--preset", "shakespeare_char_gpu"])
    assert (gpu.model.n_layer, gpu.model.n_head, gpu.model.n_kv_head) == (6, 6, 6)
    assert gpu.batch_size == 64 and gpu.model.dropout == 0.2
    # nanoGPT's optimizer and schedule over 1000 steps: the default Muon + WSD, and AdamW
    # over nanoGPT's 5000 steps, overfit this model (docs/training.md)
    assert (gpu.optimizer, gpu.lr_schedule, gpu.warmup_iters, gpu.max_iters) == \
        ("adamw", "cosine", 100, 1000)
    assert gpu.lr_decay_iters is None  # the cosine ends with the run
    assert (gpu.learning_rate, gpu.min_lr) == (1e-3, 1e-4)


def test_every_flag_has_help_and_shows_its_default():
    actions = [a for a in build_parser()._actions if a.option_strings != ["-h", "--help"]]
    flags = {a.dest for a in actions}
    settings = default_settings()
    assert flags >= (set(settings) - {"model"}) | (set(settings["model"]) - _NOT_FLAGS)
    for a in actions:
        assert a.help and "(default: " in a.help, a.option_strings
    assert "(default: None)" in next(a.help for a in actions if a.dest == "n_kv_head")


def test_choice_flags_offer_the_literal_types_values():
    actions = {a.dest: a for a in build_parser()._actions}
    literals = 0
    for cls in (GPTConfig, TrainConfig):
        for name, kind in typing.get_type_hints(cls).items():
            if typing.get_origin(kind) is typing.Union:  # Optional[Literal[...]]
                kind = typing.get_args(kind)[0]
            if typing.get_origin(kind) is typing.Literal:
                literals += 1
                assert tuple(actions[name].choices) == typing.get_args(kind), name
    assert literals == 11  # activation, norm, mlp, pos_embedding, attn_backend, tokenizer, ...
    assert actions["attn_backend"].choices == BACKENDS
    with pytest.raises(ConfigError, match="GPTConfig.activation must be one of gelu, gelu_tanh, "
                                          "silu, relu2, got 'swish'"):
        GPTConfig(activation="swish")


def test_fixed_on_resume_is_the_shape_and_the_tokenizer():
    assert set(fixed_on_resume()) == {
        "tokenizer", "optimizer", "init_from", "block_size", "n_layer", "n_head", "n_kv_head",
        "n_embd", "head_dim", "bias", "attn_bias", "mlp_bias", "norm_bias", "pos_embedding",
        "rope_theta", "rope_scaling", "norm", "norm_eps", "mlp", "intermediate_size",
        "activation", "qk_norm", "attn_gate", "value_embeds", "unet_skips", "logit_softcap",
        "tie_embeddings", "zero_init_proj", "window", "layer_heads", "layer_kv_heads"}


TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
        "--batch-size", "2", "--eval-iters", "1", "--no-progress", "--attn-backend", "sdpa"]


def test_config_file_then_flags_and_the_resolved_config_beside_the_checkpoint(text_file,
                                                                            tmp_path):
    out = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text(f'data = "{text_file}"\nout_dir = "{out}"\nmax_iters = 3\n'
                    f'eval_interval = 3\nseed = 5\n[model]\nn_layer = 3\nn_head = 2\n'
                    f'n_embd = 16\n', encoding="utf-8")
    cfg, state = resolve_config(["--config", str(toml), "--n-layer", "1", "--seed", "7"])
    assert state is None and cfg.model.n_layer == 1 and cfg.seed == 7 and cfg.max_iters == 3
    assert main(["--config", str(toml), *TINY]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["n_layer"] == 1 and saved["max_iters"] == 3
    assert saved["model"]["vocab_size"] > 1  # the tokenizer's, not the default
    again, _ = resolve_config(["--config", str(out / "config.json")])
    assert again.to_dict() == saved
    assert (out / "curves.png").is_file()


def test_bad_config_file_is_reported_with_the_flag(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = 0\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        resolve_config(["--config", str(bad)])
    assert f"argument --config: {bad}: key batch_size must be > 0, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        resolve_config(["--config", str(tmp_path / "settings.ini")])
    assert ".toml or .json" in capsys.readouterr().err


def test_resume_reads_the_checkpoint_once(text_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    common = ["--data", str(text_file), "--out-dir", str(out), "--eval-interval", "2", *TINY]
    assert main(common + ["--max-iters", "2"]) == 0
    reads = []
    real = checkpoint_module.torch.load

    def counting_load(*a, **kw):
        reads.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(checkpoint_module.torch, "load", counting_load)
    assert main(["--out-dir", str(out), "--resume", "--max-iters", "4", "--no-progress"]) == 0
    assert len([p for p in reads if str(p).endswith("ckpt.pt")]) == 1
    assert json.loads((out / "config.json").read_text())["max_iters"] == 4


# Each a file that once did damage or crashed: a string "false" that replaced a checkpoint, a
# "no" that resumed a run, a model that is not a table, a list at the top level, a key that is
# not a setting (reported as a flag), an attention backend that does not exist (a traceback
# after the out-dir was made).
@pytest.mark.parametrize("suffix, text, key", [
    (".toml", 'overwrite = "false"', "key overwrite must be a bool"),
    (".json", '{"resume": "no"}', "key resume must be a bool"),
    (".json", '{"compile": "no"}', "key compile must be a bool"),
    (".json", '{"model": 5}', "key model must be a table"),
    (".json", '[1, 2]', "the file must be a table"),
    (".toml", 'seed = "abc"', "key seed must be an int"),
    (".toml", 'out_dir = 5', "key out_dir must be a non-empty string"),
    (".toml", '[model]\nattn_backend = "flash"', "key model.attn_backend must be one of ext"),
    (".toml", 'foo_bar = 1', "key foo_bar is not a setting"),
    (".toml", '[model]\nfoo = 1', "key model.foo is not a setting"),
    (".json", '{"seed": 99999999999999999999999}', "key seed must be an int"),
    (".json", '{"model": {"vocab_size": 1099511627776}}', "key model.vocab_size must be at most"),
    (".json", '{"model": {"layer_heads": "4,4"}}', "key model.layer_heads must be a list of ints"),
])
def test_config_files_are_typed_and_refused_in_one_line_before_any_side_effect(
        text_file, tmp_path, capsys, suffix, text, key):
    out = tmp_path / "run"
    path = tmp_path / f"run{suffix}"
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(path), "--out-dir", str(out), "--data", str(text_file),
              "--max-iters", "1", *[a for a in TINY if a not in ("--attn-backend", "sdpa")]])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"argument --config: {path}: {key}" in err, err
    assert "--foo-bar" not in err and not out.exists()


def test_a_string_false_never_replaces_a_checkpoint(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", str(text_file), "--out-dir", str(out), "--max-iters", "2",
              "--eval-interval", "2", *TINY]
    assert main(common) == 0
    before = (out / "ckpt.pt").read_bytes()
    toml = tmp_path / "again.toml"
    toml.write_text('overwrite = "false"\nseed = 9\n', encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["--config", str(toml), *common])
    assert (out / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("kw, name, words", [
    (dict(attn_backend="flash"), "attn_backend", "must be one of ext, sdpa, naive"),
    (dict(vocab_size=2 ** 40), "vocab_size", "at most 2^32"),
    (dict(vocab_size=2 ** 31, n_embd=1024, n_head=8), "vocab_size", "parameters"),
    (dict(n_layer=10 ** 6, n_embd=1024, n_head=8), "n_layer", "parameters"),
    (dict(bias="no"), "bias", "must be a bool"),
    (dict(n_layer=2.0), "n_layer", "must be an int"),
    (dict(rope_theta="1e4"), "rope_theta", "must be a number"),
])
def test_gpt_config_refuses_wrong_types_unknown_backends_and_absurd_sizes(kw, name, words):
    with pytest.raises(ConfigError) as info:  # at once: nothing is allocated
        GPTConfig(**kw)
    assert info.value.name == name and words in str(info.value), str(info.value)


def test_train_config_types_and_seed_range():
    for kw, name in [(dict(overwrite="false"), "overwrite"), (dict(resume="no"), "resume"),
                     (dict(compile="no"), "compile"), (dict(progress=1), "progress"),
                     (dict(seed=-1), "seed"), (dict(seed=2 ** 64), "seed"),
                     (dict(out_dir=5), "out_dir"), (dict(data=""), "data"),
                     (dict(logger="mlflow"), "logger"), (dict(model=5), "model")]:
        with pytest.raises(ConfigError) as info:
            TrainConfig(**kw)
        assert info.value.name == name, (kw, str(info.value))
    assert TrainConfig(learning_rate=1).learning_rate == 1.0  # an int where a float goes
    assert isinstance(TrainConfig(learning_rate=1).learning_rate, float)


def test_huge_seed_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        resolve_config(["--seed", "99999999999999999999999"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "argument --seed" in err, err


def test_dry_run_checks_and_writes_nothing(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--data", str(text_file), "--out-dir", str(out), "--dry-run", *TINY]) == 0
    assert json.loads(capsys.readouterr().out)["out_dir"] == str(out)
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    assert main(["--data", str(text_file), "--out-dir", str(tmp_path / "file"),
                 "--dry-run", *TINY]) == 2
    assert "out_dir" in capsys.readouterr().err
