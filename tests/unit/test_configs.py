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
    assert cfg.data.batch_size > 0
    assert cfg.model.image_size == cfg.data.image_size, "model and data image sizes disagree"
    assert cfg.model.max_text_length >= cfg.data.max_length
    # round trip through a plain dict (what checkpoints store)
    assert config_from_dict(to_dict(cfg)) == cfg


def test_dotted_overrides_and_bare_leaf():
    cfg = load_config(CONFIGS[0], ["data.batch_size=8", "max_steps=7", "optim.lr=3e-4"])
    assert cfg.data.batch_size == 8
    assert cfg.train.max_steps == 7
    assert cfg.optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("data.batch_sise=3", "did you mean 'data.batch_size'"),
        ("modle.width=3", "did you mean 'model.width'"),
        ("optim.learning_rate=3e-4", "did you mean 'optim.lr'"),  # initials / synonym, not spelling
        ("learning_rate=3e-4", "did you mean 'optim.lr'"),
        ("optim.wd=0.1", "did you mean 'optim.weight_decay'"),
        ("eval.bs=8", "did you mean 'eval.batch_size'"),
        ("optim.lr=fast", "optim.lr"),
        ("data.batch_size=2.5", "data.batch_size"),
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
    p.write_text("data:\n  batch_size: 4\n  shufle_buffer: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "bad.yaml" in msg and "data.shufle_buffer" in msg and "data.shuffle_buffer" in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_all_keys_are_dotted_leaves():
    keys = all_keys()
    assert "data.batch_size" in keys and "train.max_steps" in keys and "seed" in keys


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
    assert "# (default 32) Global batch size per optimizer micro-step" in text  # docstrings reach the listing
    assert train.main(["--print-config"]) == 0 and "batch_size: 32" in capsys.readouterr().out
    assert train.main([]) == 2 and "--print-config" in capsys.readouterr().err
