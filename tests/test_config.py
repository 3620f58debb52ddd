"""One home per setting: old names still load, conflicts raise naming both settings, nothing is dropped."""

import inspect
import json
import logging

import pytest
import torch

import cloc_hf
from cloc_hf import CLOCConfig
from training.config import PretrainConfig

# --------------------------------------------------------------------------------------------------
# CLOCConfig: grounding_loss (a loss kind) renamed grounding_loss_type
# --------------------------------------------------------------------------------------------------


def test_old_config_json_with_grounding_loss_still_loads(tmp_path):
    saved = CLOCConfig(grounding_loss_type="l1_giou").to_dict()
    assert "grounding_loss" not in saved and saved["grounding_loss_type"] == "l1_giou"
    saved["grounding_loss"] = saved.pop("grounding_loss_type")  # a config.json written before the rename
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.warns(FutureWarning, match="grounding_loss is renamed grounding_loss_type"):
        config = CLOCConfig.from_pretrained(tmp_path)
    assert config.grounding_loss_type == "l1_giou"
    assert "grounding_loss" not in config.to_dict()  # saved again under the new name only


def test_grounding_loss_old_name_conflicts_raise_naming_both():
    with pytest.raises(ValueError, match=r"grounding_loss='l1_giou'.*grounding_loss_type='l2'"):
        CLOCConfig(grounding_loss="l1_giou", grounding_loss_type="l2")
    with pytest.raises(ValueError, match="use_grounding_loss"):  # the old PretrainConfig switch, given to the model
        CLOCConfig(grounding_loss=False)


def test_unknown_model_override_raises_instead_of_being_stored():
    # PreTrainedConfig keeps unknown keys as attributes, so a misspelt override used to do nothing
    with pytest.raises(ValueError, match="'text_filter' is not a CLOCConfig field"):
        cloc_hf.get_model_config("cloc-tiny", text_filter=False)
    with pytest.raises(ValueError, match="promter_type"):
        PretrainConfig(model_overrides={"prompter_config": {"promter_type": "roi_align"}})


def test_loss_functions_take_the_filter_threshold_from_the_config():
    """The threshold's one home is CLOCConfig: the loss functions keep no default of their own."""
    from cloc_hf.loss import cloc_losses, region_text_contrastive_loss

    empty = inspect.Parameter.empty
    assert inspect.signature(region_text_contrastive_loss).parameters["filter_threshold"].default is empty
    for name in ("text_filter_threshold", "region_loss_weight", "grounding_loss_type", "grounding_loss_weight"):
        assert inspect.signature(cloc_losses).parameters[name].default is empty, name
    assert CLOCConfig().text_filter_threshold == 0.9  # the paper's value, set here only


# --------------------------------------------------------------------------------------------------
# PretrainConfig: run settings only; old fields move to their home or raise
# --------------------------------------------------------------------------------------------------


def test_old_pretrain_fields_move_to_their_home(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"max_regions": 2, "prompter_type": "roi_align", "text_filter": False,
                                "grounding_loss": False, "steps": 5}))
    with pytest.warns(FutureWarning, match="max_regions is deprecated"):
        config = PretrainConfig.load(path)
    assert config.regions_per_image == 2 and config.collator_regions == 2
    assert config.model_overrides == {"prompter_config": {"prompter_type": "roi_align"},
                                      "text_filter_threshold": None, "use_grounding_loss": False}
    model_config = config.model_config()
    assert model_config.prompter_config.prompter_type == "roi_align"
    assert model_config.text_filter_threshold is None and model_config.use_grounding_loss is False
    saved = config.to_dict()
    assert not {"max_regions", "prompter_type", "text_filter", "grounding_loss"} & set(saved)
    assert PretrainConfig.from_dict(saved) == config  # what a run saves loads back unchanged


@pytest.mark.parametrize("kwargs, both", [
    (dict(prompter_type="transformer", model_overrides={"prompter_config": {"prompter_type": "roi_align"}}),
     r"prompter_type='transformer'.*model_overrides\.prompter_config\.prompter_type='roi_align'"),
    (dict(text_filter=False, model_overrides={"text_filter_threshold": 0.9999}),
     r"text_filter=False.*model_overrides\.text_filter_threshold=0\.9999"),
    (dict(text_filter=True, model_overrides={"text_filter_threshold": None}),
     r"text_filter=True.*model_overrides\.text_filter_threshold=None"),
    (dict(grounding_loss=True, model_overrides={"use_grounding_loss": False}),
     r"grounding_loss=True.*model_overrides\.use_grounding_loss=False"),
    (dict(max_regions=2, regions_per_image=3), r"max_regions=2.*regions_per_image=3"),
])
def test_conflicting_settings_raise_naming_both(kwargs, both):
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=both):
        PretrainConfig(**kwargs)


def test_grounding_loss_switch_is_not_the_loss_kind():
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="grounding_loss_type"):
        PretrainConfig(grounding_loss="l1_giou")


# --------------------------------------------------------------------------------------------------
# init_from: overrides are applied or refused, never dropped
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(3)
    cloc_hf.create_model("cloc-tiny").save_pretrained(path)
    return path


def test_init_from_applies_loss_overrides(checkpoint):
    from training.pretrain import build_model

    config = PretrainConfig(init_from=str(checkpoint), model_overrides={
        "text_filter_threshold": None, "grounding_loss_weight": 5.0, "prompter_config": {"prompter_type": "transformer"}})
    model = build_model(config)
    assert model.config.text_filter_threshold is None and model.config.grounding_loss_weight == 5.0
    source = cloc_hf.CLOCModel.from_pretrained(checkpoint)
    for name, value in source.state_dict().items():  # an unchanged prompter_config keeps the trained Prompter
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)


def test_init_from_applies_prompter_overrides_with_one_notice(checkpoint, caplog):
    from training.pretrain import build_model

    source = cloc_hf.CLOCModel.from_pretrained(checkpoint).state_dict()
    config = PretrainConfig(init_from=str(checkpoint), model_overrides={"prompter_config": {"prompter_type": "roi_align"}})
    with caplog.at_level(logging.WARNING, logger="cloc.pretrain"):
        model = build_model(config)
    assert model.config.prompter_config.prompter_type == "roi_align" and model.box_head is None
    notices = [r for r in caplog.records if "Prompter and box head are rebuilt" in r.getMessage()]
    assert len(notices) == 1 and "roi_align" in notices[0].getMessage()
    state = model.state_dict()
    for name, value in source.items():
        if not name.startswith(("prompter.", "box_head.")):
            torch.testing.assert_close(state[name], value, msg=name)  # towers keep the checkpoint's weights

    config = PretrainConfig(init_from=str(checkpoint), model_overrides={"prompter_config": {"prompt_position": "token"}})
    model = build_model(config)
    assert model.config.prompter_config.prompt_position == "token"
    assert model.prompter.prompt_encoder.prompt_position == "token"  # the modules use it, not just the config


def test_init_from_refuses_overrides_that_change_loaded_weights(checkpoint):
    with pytest.raises(ValueError, match=r"\['projection_dim'\].*init_from="):
        PretrainConfig(init_from=str(checkpoint), model_overrides={"projection_dim": 16})
    with pytest.raises(ValueError, match=r"arch='cloc-vit-b-16' conflicts with init_from="):
        PretrainConfig(init_from=str(checkpoint), arch="cloc-vit-b-16")  # was silently ignored


def test_model_card_reads_the_renamed_regions_per_image():
    from model_cards.generate import training_summary

    assert "up to 2 regions per image" in training_summary(PretrainConfig(regions_per_image=2).to_dict())
    assert "up to 3 regions per image" in training_summary({"max_regions": 3})  # a pretrain_config.json of before
