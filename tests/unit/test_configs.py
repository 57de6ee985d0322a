"""Every shipped config parses; unknown keys and bad values fail with a named key."""

from pathlib import Path

import pytest

from mmpretrain.config import ConfigError, all_keys, config_from_dict, load_config, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(path):
    cfg = load_config(path)
    assert cfg.data.global_batch_size > 0
    assert cfg.model.image_size == cfg.data.image_size, "model and data image sizes disagree"
    assert cfg.model.max_text_length >= cfg.data.max_length
    # round trip through a plain dict (what checkpoints store)
    assert config_from_dict(to_dict(cfg)) == cfg


def test_dotted_overrides_and_bare_leaf():
    cfg = load_config(CONFIGS[0], ["data.global_batch_size=8", "max_steps=7", "optim.lr=3e-4"])
    assert cfg.data.global_batch_size == 8
    assert cfg.train.max_steps == 7
    assert cfg.optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("data.global_batch_sise=3", "did you mean 'data.global_batch_size'"),
        ("data.bs=3", "did you mean 'data.global_batch_size'"),
        ("modle.width=3", "did you mean 'model.width'"),
        ("optim.learning_rate=3e-4", "did you mean 'optim.lr'"),  # initials / synonym, not spelling
        ("learning_rate=3e-4", "did you mean 'optim.lr'"),
        ("optim.wd=0.1", "did you mean 'optim.weight_decay'"),
        ("eval.bs=8", "did you mean 'eval.batch_size'"),
        ("optim.lr=fast", "optim.lr"),
        ("data.global_batch_size=2.5", "data.global_batch_size"),
        ("train.tensorboard=maybe", "train.tensorboard"),
        ("nonsense", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, [override])


def test_brace_patterns_with_urls_in_overrides():
    """Unquoted brace patterns (a flow collection to YAML) are shard patterns, alone or in a list."""
    url = "http://127.0.0.1:8000/train-{000000..000003}.tar"
    cfg = load_config(None, [f"data.train_shards=[{url}]", "data.val_shards=s3://b/val-{0,1}.tar",
                             "data.num_samples=4000"])
    assert cfg.data.train_shards == [url] and cfg.data.val_shards == "s3://b/val-{0,1}.tar"
    assert load_config(None, [f"data.train_shards={url}"]).data.train_shards == [url]
    cfg = load_config(None, ["data.train_shards=[a/x-{000..003}.tar, 'pipe:curl -s http://h/y-{0..1}.tar', b/*.tar]",
                             "data.val_shards={000000..000002}.tar", "data.train_crop_scale=[0.8, 1.0]"])
    assert cfg.data.train_shards == ["a/x-{000..003}.tar", "pipe:curl -s http://h/y-{0..1}.tar", "b/*.tar"]
    assert cfg.data.val_shards == "{000000..000002}.tar" and cfg.data.train_crop_scale == [0.8, 1.0]


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  global_batch_size: 4\n  shufle_buffer: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "bad.yaml" in msg and "data.shufle_buffer" in msg and "data.shuffle_buffer" in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_all_keys_are_dotted_leaves():
    keys = all_keys()
    assert "data.global_batch_size" in keys and "train.max_steps" in keys and "seed" in keys
    assert "data.batch_size" not in keys  # the old name reads (RENAMED) but is no key of the tree


def test_print_config_lists_every_key_with_its_doc_and_round_trips(capsys):
    import yaml

    from mmpretrain import train
    from mmpretrain.config import all_keys, config_from_dict, load_config, to_dict

    assert train.main(["--config", "configs/tiny.yaml", "--print-config", "optim.lr=3e-4"]) == 0
    text = capsys.readouterr().out
    tree = yaml.safe_load(text)
    assert to_dict(config_from_dict(tree)) == to_dict(load_config("configs/tiny.yaml", ["optim.lr=3e-4"]))
    for key in all_keys():
        node = tree
        for part in key.split("."):
            node = node[part]  # every key is listed
    assert "# (default 4096) Vocabulary size" in text  # the value differs from the default: both shown
    assert "# (default 32) The global batch of one micro-step" in text  # docstrings reach the listing
    assert train.main(["--print-config"]) == 0 and "global_batch_size: 32" in capsys.readouterr().out
    assert train.main([]) == 2 and "--print-config" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Literal choices

FIXED = {"model.arch", "model.image_stem", "model.fusion", "model.pool", "model.image_pool", "model.fusion_source", "model.itm_readout", "model.itm_head",
         "data.train_crop", "loss.contrastive", "loss.itm_exchange", "train.mixed_precision",
         "eval.itm_rerank_score", "eval.classify_itm_prompts"}


def test_the_fixed_string_fields_are_literals():
    from mmpretrain.config import literal_choices

    choices = literal_choices()
    assert set(choices) == FIXED
    assert choices["train.mixed_precision"] == ("no", "bf16", "fp16")
    assert choices["model.arch"] == ("unified", "dual_encoder")


@pytest.mark.parametrize("key", sorted(FIXED))
def test_a_value_outside_the_choices_is_one_line_naming_key_and_choices(key):
    from mmpretrain.config import literal_choices

    allowed = literal_choices()[key]
    for value in allowed:  # every allowed value loads, as its string
        cfg = load_config(None, [f"{key}={value}"])
        section, leaf = key.split(".")
        assert getattr(getattr(cfg, section), leaf) == value
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=nonsense"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{key}: 'nonsense' is not one of ")
    assert all(repr(v) in msg for v in allowed), msg


def test_literal_errors_in_yaml_and_on_the_command_line(tmp_path, capsys):
    from mmpretrain import train

    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  arch: dual\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.arch: 'dual' is not one of 'unified', "
                                          r"'dual_encoder'; did you mean 'dual_encoder'\?"):
        load_config(p)
    assert train.main(["--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.arch" in err and "'unified', 'dual_encoder'" in err
    # YAML reads a bare no / off as false: the one choice spelled so is meant
    assert load_config(None, ["train.mixed_precision=off"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"train.mixed_precision: True \(YAML reads a bare yes/no/on/off"):
        load_config(None, ["train.mixed_precision=yes"])


def test_every_key_has_a_docstring():
    import dataclasses
    import typing

    from mmpretrain.config import Config, field_docs

    missing = []

    def walk(cls, prefix=""):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, prefix + f.name + ".")
            elif len(docs.get(f.name, "")) < 10:
                missing.append(prefix + f.name)

    walk(Config)
    assert not missing, missing


def test_print_config_shows_the_choices_and_the_links(capsys):
    from mmpretrain import train

    assert train.main(["--print-config", "model.fusion_source=towers"]) == 0
    text = capsys.readouterr().out
    assert "# (one of unified | dual_encoder) 'unified'" in text
    assert "# (default inputs; one of inputs | towers) unified: what the fused" in text
    assert "# model.image_size = data.image_size" in text and "# data.max_length <= model.max_text_length" in text


# ----------------------------------------------------------------------------- cross-section facts

def _sides(cfg):
    return cfg.model.image_size, cfg.data.image_size, cfg.data.max_length, cfg.model.max_text_length


@pytest.mark.parametrize("overrides,expected", [
    (["model.image_size=32"], (32, 32, 32, 32)),
    (["data.image_size=48"], (48, 48, 32, 32)),
    (["data.max_length=16"], (64, 64, 16, 16)),
    (["model.max_text_length=40"], (64, 64, 40, 40)),
    (["data.max_length=16", "model.max_text_length=40"], (64, 64, 16, 40)),  # fewer tokens than positions
    (["model.image_size=96", "data.image_size=96"], (96, 96, 32, 32)),
])
def test_one_side_set_the_other_follows(overrides, expected):
    assert _sides(load_config(None, overrides)) == expected
    # on top of a shipped config that sets both sides (64 / 32, as the defaults): the override
    # still moves both
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    assert _sides(load_config(tiny)) == (64, 64, 32, 32)
    assert _sides(load_config(tiny, overrides)) == expected


def test_a_bare_leaf_naming_both_sides_of_a_link_sets_both():
    assert _sides(load_config(None, ["image_size=96"])) == (96, 96, 32, 32)
    with pytest.raises(ConfigError, match="override key 'batch_size' is ambiguous"):
        load_config(None, ["batch_size=8"])  # data.global_batch_size (formerly data.batch_size) and eval.batch_size


def test_a_yaml_file_that_sets_one_side(tmp_path):
    p = tmp_path / "one.yaml"
    p.write_text("data:\n  image_size: 32\nmodel:\n  max_text_length: 24\n")
    assert _sides(load_config(p)) == (32, 32, 24, 24)
    # the overrides are a later layer: one side there moves both sides of the file
    assert _sides(load_config(p, ["model.image_size=16", "data.max_length=20"])) == (16, 16, 20, 20)


@pytest.mark.parametrize("overrides,keys", [
    (["model.image_size=32", "data.image_size=64"], ("model.image_size=32", "data.image_size=64")),
    (["data.max_length=40", "model.max_text_length=32"], ("data.max_length=40", "model.max_text_length=32")),
])
def test_both_sides_set_and_disagreeing_is_one_line_naming_both(tmp_path, overrides, keys):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert "\n" not in msg and all(k in msg for k in keys) and "disagree" in msg
    p = tmp_path / "both.yaml"  # the same two values in one file
    p.write_text("".join(f"{o.split('.')[0]}:\n  {o.split('.')[1].replace('=', ': ')}\n" for o in overrides))
    with pytest.raises(ConfigError, match=r"both\.yaml: .*disagree"):
        load_config(p)


def test_a_checkpoint_tree_is_checked_too():
    tree = to_dict(load_config(None))
    tree["data"]["image_size"] = 32
    with pytest.raises(ConfigError, match=r"model.image_size=64 and data.image_size=32 disagree"):
        config_from_dict(tree)
    del tree["model"]["image_size"]  # an older or hand-written tree with one side: it follows
    assert config_from_dict(tree).model.image_size == 32
    assert tree["model"].get("image_size") is None  # the caller's dict is not changed
