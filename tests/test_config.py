"""The typed run configuration: paper defaults, overrides, one-line errors naming the key, recipes."""
from __future__ import annotations

import pydantic
import pytest

from resnetlab.config import RunConfig, build_config, parse_override, validate_config
from resnetlab.errors import ConfigError
from resnetlab.experiments.recipes import DEFAULT_RECIPE, get_recipe, list_recipes


def test_defaults_are_the_papers_cifar_recipe():
    cfg = RunConfig()
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert cfg.train.batch_size == 128 and cfg.train.steps == 64000
    assert (cfg.schedule.kind, cfg.schedule.milestones, cfg.schedule.unit) == ("multistep", [32000, 48000], "steps")
    assert cfg.data.val_size == 5000 and cfg.data.normalization == "per_pixel"
    assert (cfg.data.crop_padding, cfg.data.flip) == (4, True)


@pytest.mark.parametrize("item, key, value", [
    ("optim.lr=0.05", "optim.lr", 0.05),
    ("optim.lr=1e-3", "optim.lr", 1e-3),
    ("optim.nesterov=true", "optim.nesterov", True),
    ("schedule.milestones=[80, 160]", "schedule.milestones", [80, 160]),
    ("train.steps=null", "train.steps", None),
    ("model.options.block=preact", "model.options.block", "preact"),
    ("out=runs/a=b", "out", "runs/a=b"),
])
def test_override_values_are_read_as_yaml(item, key, value):
    assert parse_override(item) == (key, value)


def test_overrides_apply_over_recipe_and_flags():
    cfg = build_config("wilber-cifar", overrides=["optim.lr=0.05", "train.epochs=3"], **{"train.seed": 7})
    assert cfg.optim.lr == 0.05 and cfg.train.epochs == 3 and cfg.train.seed == 7
    assert cfg.optim.nesterov is True and cfg.recipe == "wilber-cifar"


@pytest.mark.parametrize("item, expected", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("schedule.warmup.kindd=linear", "unknown config key 'schedule.warmup.kindd'"),
    ("nonsense.x=1", "unknown config key 'nonsense'"),
])
def test_unknown_key_is_one_line_naming_the_dotted_key(item, expected):
    with pytest.raises(ConfigError) as error:
        build_config(overrides=[item])
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


@pytest.mark.parametrize("item, key", [
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=-0.1", "optim.lr"),
    ("train.epochs=-2", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("optim.name=sgdd", "optim.name"),
    ("schedule.milestones=[160, 80]", "schedule.milestones"),
    ("runtime.device=gpu", "runtime.device"),
    ("bn.momentum=2", "bn.momentum"),
    ("model.options.width=-1", "model.options"),
    ("model.options.colour=red", "model.options"),
    ("model.name=resnet21", "model.name"),
    ("schedule.warmup.kind=constant", "schedule.warmup"),
    ("data.flip_mode=sometimes", "data.flip_mode"),
    ("train.final_tta=[flip, 10crop]", "train.final_tta[1]"),
])
def test_invalid_value_is_one_line_naming_the_key(item, key):
    with pytest.raises(ConfigError) as error:
        build_config(overrides=[item])
    message = str(error.value)
    assert f"'{key}'" in message and "\n" not in message


def test_a_run_needs_a_budget_and_onecycle_has_no_extra_warmup():
    with pytest.raises(ConfigError, match="train.epochs or train.steps"):
        build_config(overrides=["train.steps=null"])
    with pytest.raises(ConfigError, match="one-cycle has its own warm-up"):
        build_config("fast-cifar", overrides=["schedule.kind=onecycle"])


def test_config_is_frozen_and_round_trips_through_json():
    cfg = build_config("he2016-cifar-110")
    with pytest.raises(pydantic.ValidationError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    assert validate_config(cfg.to_dict()) == cfg
    assert cfg.replace(**{"optim.lr": 0.2}).optim.lr == 0.2 and cfg.optim.lr == 0.1


def test_recipe_file_is_a_partial_yaml_config(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  lr: 0.2\ntrain:\n  epochs: 5\n  steps: null\n")
    cfg = build_config(recipe_file=path)
    assert cfg.optim.lr == 0.2 and cfg.train.epochs == 5 and cfg.optim.weight_decay == 1e-4
    path.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(recipe_file=path)
    path.write_text("optim:\n  lrate: 0.2\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrate'"):
        build_config(recipe_file=path)


def test_every_recipe_is_valid_and_cites_a_source():
    names = [r.name for r in list_recipes()]
    assert {"he2016-cifar", "he2016-cifar-110", "wilber-cifar", "fast-cifar"} <= set(names)
    assert DEFAULT_RECIPE in names
    for recipe in list_recipes():
        assert recipe.source and "\n" not in recipe.description
        assert build_config(recipe.name).recipe == recipe.name


def test_recipes_state_the_paper_and_seed_numbers():
    paper = build_config("he2016-cifar")
    assert paper.train.steps == 64000 and paper.schedule.milestones == [32000, 48000]
    r110 = build_config("he2016-cifar-110")
    warmup = r110.schedule.warmup
    assert r110.model.name == "resnet110"
    assert (warmup.kind, warmup.lr, warmup.error_threshold, warmup.cap_steps) == ("until_error", 0.01, 0.8, 400)
    wilber = build_config("wilber-cifar")
    assert wilber.optim.nesterov and wilber.train.epochs == 200 and wilber.schedule.milestones == [80, 160]
    assert wilber.schedule.unit == "epochs"


def test_unknown_recipe_is_one_line():
    with pytest.raises(Exception, match="unknown recipe 'he2017'") as error:
        get_recipe("he2017")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("override", ["train.batch_size=true", "optim.lr=false", "train.epochs=true",
                                      "train.ema_decay=true", "data.val_size=false"])
def test_boolean_for_a_number_is_a_config_error(override):
    # pydantic's lax mode would read `true` as 1: a batch of one image instead of an error.
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}'.*boolean"):
        build_config(overrides=[override])


@pytest.mark.parametrize("override", ["data.flip=false", "runtime.channels_last=true", "optim.nesterov=true"])
def test_boolean_fields_still_take_booleans(override):
    build_config(overrides=[override])


def test_alternating_flips_reach_the_loader_and_need_the_cifar_pipeline():
    from resnetlab.engine.data import augment_spec

    assert augment_spec(build_config(overrides=["data.flip_mode=alternate"])).flip_mode == "alternate"
    assert augment_spec(build_config()).flip_mode == "random"
    for conflict in ("data.pipeline=imagenet", "data.flip=false"):
        with pytest.raises(ConfigError, match="flip_mode 'alternate'"):
            build_config(overrides=["data.flip_mode=alternate", conflict])


def test_fast_cifar_is_v1_with_the_batch_crops_smoothing_and_bias_decay_chosen_on_validation():
    fast, v1 = build_config("fast-cifar"), build_config("fast-cifar-v1")
    assert (v1.train.batch_size, v1.data.crop_padding, v1.data.padding_mode) == (128, 4, "zeros")
    assert (fast.train.batch_size, fast.data.crop_padding, fast.data.padding_mode) == (64, 2, "reflect")
    assert (v1.train.label_smoothing, fast.train.label_smoothing) == (0.1, 0.2)
    assert (v1.optim.no_wd_bn_bias, fast.optim.no_wd_bn_bias) == (False, True)
    differing = {(section, key) for section in ("data", "optim", "schedule", "train", "runtime")
                 for key, value in getattr(fast, section).model_dump().items()
                 if getattr(v1, section).model_dump()[key] != value}
    assert differing == {("data", "crop_padding"), ("data", "padding_mode"), ("train", "batch_size"),
                         ("train", "label_smoothing"), ("optim", "no_wd_bn_bias"),
                         ("train", "final_tta")}  # the last only evaluates
    assert (v1.train.final_tta, fast.train.final_tta) == ((), ("flip", "flip-shift"))


def test_fast_cifar_15_differs_from_fast_cifar_only_in_what_was_chosen_at_15_epochs():
    fast, short = build_config("fast-cifar"), build_config("fast-cifar-15")
    assert (short.train.epochs, short.train.label_smoothing, short.schedule.kind) == (15, 0.1, "linear")
    assert short.data.flip_mode == "alternate"
    assert (short.bn.reestimate, short.bn.reestimate_batches) == (True, 160)
    assert short.schedule.warmup == fast.schedule.warmup
    differing = {(section, key) for section in ("model", "data", "optim", "schedule", "bn", "train", "runtime")
                 for key, value in getattr(short, section).model_dump().items()
                 if getattr(fast, section).model_dump()[key] != value}
    assert differing == {("train", "epochs"), ("train", "label_smoothing"), ("schedule", "kind"), ("optim", "no_wd_bn_bias"),
                         ("bn", "reestimate"), ("bn", "reestimate_batches"), ("data", "flip_mode")}
    assert not short.optim.no_wd_bn_bias  # as its results were measured
