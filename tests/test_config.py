import pytest

from retrieval_lib.settings import config


def test_every_experiment_has_full_and_demo_variants():
    assert config.EXPERIMENTS == ("minimind27_10k", "minimind38_96k", "minimind108_10k",
                                  "minimind108_96k", "minimind108_288k", "minimind186_288k",
                                  "qwen2_494_288k", "qwen2_613_288k")
    for name in config.EXPERIMENTS:
        full = config.get_experiment(name, "full")
        demo = config.get_experiment(name, "demo")
        assert (full.preset, demo.preset) == ("full", "demo")
        assert full.model.architecture == demo.model.architecture
        assert (full.model.num_new_layers > 0) == (demo.model.num_new_layers > 0)
        assert demo.model.num_new_layers == config.DEMO_NEW_LAYERS.get(name, 0)
        assert full.model.projection_dim == demo.model.projection_dim == 128
        assert full.data.kind == "bge_m3_zh" and demo.data.kind == "demo"
        # the demo twin keeps the grouped-query ratio of the real model
        assert (full.model.num_attention_heads % full.model.num_key_value_heads == 0
                and demo.model.num_attention_heads % demo.model.num_key_value_heads == 0)
        assert demo.model.hidden_size < full.model.hidden_size


def test_report_sizes_and_expansions():
    cases = {  # name: (subset size, base depth, new layers, width)
        "minimind27_10k": (10_000, 8, 0, 512),
        "minimind38_96k": (96_000, 8, 4, 512),
        "minimind108_10k": (10_000, 16, 0, 768),
        "minimind108_96k": (96_000, 16, 0, 768),
        "minimind108_288k": (288_000, 16, 0, 768),
        "minimind186_288k": (288_000, 16, 12, 768),
        "qwen2_494_288k": (288_000, 24, 0, 896),
        "qwen2_613_288k": (288_000, 24, 8, 896),
    }
    for name, (size, depth, new, width) in cases.items():
        cfg = config.get_experiment(name, "full")
        assert (cfg.train_size, cfg.model.num_hidden_layers, cfg.model.num_new_layers,
                cfg.model.hidden_size) == (size, depth, new, width), name
    assert config.get_experiment("qwen2_613_288k", "full").model.pooling == "last_token"
    assert config.get_experiment("minimind108_10k", "full").model.pooling == "mean"
    full = config.get_data_config("full")
    assert (full.val_size, full.test_size) == (800, 800)


def test_demo_subsets_are_nested_and_smaller():
    demo = config.get_data_config("demo")
    sizes = list(demo.subset_sizes.values())
    assert sizes == sorted(sizes) and list(demo.subset_sizes) == ["10k", "96k", "288k"]


def test_auto_resolves_by_gpu_and_says_so(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.resolve_preset("auto") == "demo"
    assert "no CUDA GPU" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config.resolve_preset("auto") == "full"
    assert "'auto' -> 'full'" in capsys.readouterr().out
    assert config.get_experiment("minimind27_10k", "auto").preset == "full"


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        config.resolve_preset("fast")
    with pytest.raises(KeyError, match="unknown experiment"):
        config.get_experiment("minimind999", "demo")


def test_overrides_and_independent_copies():
    a = config.get_data_config("demo", data_dir="/x")
    b = config.get_data_config("demo")
    a.subset_sizes["10k"] = 1
    assert b.subset_sizes["10k"] == 600 and b.data_dir is None and a.data_dir == "/x"


def test_project_root_can_be_overridden(monkeypatch, tmp_path):
    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    assert config.project_root() == tmp_path.resolve()
    assert config.cache_path(config.get_data_config("demo")) == tmp_path.resolve() / "data_cache"


def test_expansion_settings_full_and_demo():
    for name, base in (("minimind38_96k", "minimind27_10k"), ("minimind186_288k",
                       "minimind108_288k"), ("qwen2_613_288k", "qwen2_494_288k")):
        full, demo = config.get_experiment(name, "full"), config.get_experiment(name, "demo")
        assert full.base_experiment == demo.base_experiment == base
        # both spread the K + 1 stages over the run (the demo: one epoch each)
        assert full.model.unfreeze_every == demo.model.unfreeze_every == 0
        assert full.model.expansion_init == "random"
        new = demo.model.num_new_layers
        assert demo.training.epochs == new + 1
        assert demo.training.early_stopping_patience > new
        assert config.get_experiment(base, "demo").model.num_new_layers == 0


def test_variant_renames_and_overrides_reach_the_model():
    exp = config.get_experiment("minimind186_288k", "demo")
    ablation = config.variant(exp, expansion_init="identity")
    assert (ablation.name, ablation.model.expansion_init) == ("minimind186_288k-identity",
                                                              "identity")
    assert exp.model.expansion_init == "random"  # the original is unchanged
    with pytest.raises(TypeError, match="unknown ModelConfig setting"):
        config.variant(exp, layers=3)
    with pytest.raises(TypeError, match="unknown TrainingConfig setting"):
        config.variant(exp, "x", {"epoch": 3})
    ance = config.variant(exp, "ance", {"remine_every": 2}, m3_heads=True)
    assert (ance.name, ance.training.remine_every, ance.model.m3_heads) == (
        "minimind186_288k-ance", 2, True)
    assert exp.training.remine_every == 0 and not exp.model.m3_heads
    changed = config.with_overrides(exp, expansion_init="copy", unfreeze_every=1, epochs=4)
    assert (changed.name, changed.model.expansion_init, changed.model.unfreeze_every) == (
        "minimind186_288k", "copy", 1)
    with pytest.raises(ValueError, match="need more than 6 epochs"):  # 2 layers × 3 epochs
        config.with_overrides(exp, unfreeze_every=3)
    kept = config.with_overrides(exp, expansion_init=None, unfreeze_every="")
    assert kept.model == exp.model


def test_project_home_parameter_moves_every_output(monkeypatch, tmp_path):
    monkeypatch.delenv("RETRIEVAL_HOME", raising=False)
    default = config.project_root()
    assert config.set_project_home("") == default  # empty: unchanged
    home = tmp_path / "drive" / "course"
    assert config.set_project_home(str(home)) == home.resolve() and home.is_dir()
    assert config.cache_path(config.get_data_config("demo")) == home.resolve() / "data_cache"
