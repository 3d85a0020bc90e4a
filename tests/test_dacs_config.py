"""The DACS recipe files hold the published settings, and bad DeepLabV2 / SGD settings fail with
errors that name the field."""
import pytest

from pipa_jax import config as config_lib
from test_evaluate import load_config


@pytest.mark.parametrize("name", ["gta2cs_dacs.py", "synthia2cs_dacs.py"])
def test_dacs_recipe_values(name):
    c = load_config(name, "")
    synthia = name.startswith("synthia")
    m, d, o, u = c.model, c.data, c.optimizer, c.uda
    assert (m.backbone, m.decode_head, m.deeplabv2.branches) == ("resnet101", "deeplabv2", 2)
    assert m.resnet.input_convention == "caffe_bgr" and m.resnet.frozen_bn_affine and m.require_pretrained
    assert (o.name, o.learning_rate, o.head_lr_mult, o.momentum, o.weight_decay, o.poly_power, o.warmup_steps) == \
        ("sgd", 2.5e-4, 10.0, 0.9, 5e-4, 0.9, 0)
    assert o.sgd_duplicate_updates and c.total_steps == 250000 and c.batch_size == 2
    assert d.source_size == ((1280, 760) if synthia else (1280, 720)) and not d.source_keep_ratio
    assert d.target_size == (1024, 512) and d.crop_size == (512, 512) and not d.flip and not d.rcs.enabled
    assert d.source_cat_max_ratio == 1.0
    assert (u.ema_alpha, u.pseudo_threshold, u.jitter_strength, u.margin_top, u.margin_bottom) == (0.99, 0.968, 0.25, 0, 0)
    assert u.self_training and not u.fd and u.mix_per_image_classes and u.source_ce_average == "valid"
    assert not (c.pipa.pixel.enabled or c.pipa.patch.enabled or c.mic.enabled)
    assert c.eval.labels_at_test_size and c.eval.miou_subsets == ((19, 16, 13) if synthia else (19,))
    assert not load_config(name, "eval=full").eval.labels_at_test_size
    assert load_config(name, "backbone=resnet50").model.backbone == "resnet50"
    assert not load_config(name, "method=source_only").uda.self_training
    smoke = load_config(name, "smoke")
    smoke.data.source_root, smoke.data.target_root = "/x", "/y"
    config_lib.validate(smoke, 8)
    for bad, match in (("method=pipa", "expected dacs or source_only"), ("backbone=resnet18", "resnet101 or resnet50"),
                       ("eval=half", "dacs, full")):
        with pytest.raises(ValueError, match=match):
            load_config(name, bad)


def test_bad_network_and_optimizer_fields_are_named():
    def check(edit, match):
        c = load_config("gta2cs_dacs.py", "smoke")
        c.data.source_root, c.data.target_root = "/x", "/y"
        edit(c)
        with pytest.raises(ValueError, match=match):
            config_lib.validate(c, 1)
    check(lambda c: setattr(c.optimizer, "name", "adam"), r"optimizer.name = 'adam': expected 'adamw' or 'sgd'")
    check(lambda c: setattr(c.model.deeplabv2, "branches", 5), r"model.deeplabv2.branches = 5")
    check(lambda c: setattr(c.model.resnet, "input_convention", "rgb"), r"model.resnet.input_convention")
    check(lambda c: setattr(c.uda, "fd", True), r"uda.fd = True: expected False with backbone 'resnet50'")
    check(lambda c: setattr(c.uda, "source_ce_average", "mean"), r"uda.source_ce_average")

    def adamw_with_duplicates(c):
        c.optimizer.name = "adamw"
    check(adamw_with_duplicates, r"sgd_duplicate_updates = True: expected False with optimizer.name = 'adamw'")


def test_synthetic_r50_variant():
    c = load_config("synthetic.py", "method=dacs,backbone=r50")
    assert (c.model.backbone, c.model.decode_head, c.optimizer.name) == ("resnet50", "deeplabv2", "sgd")
    assert c.uda.mix_per_image_classes and c.uda.source_ce_average == "valid" and not c.uda.fd
    config_lib.validate(load_config("synthetic.py", "method=dacs,backbone=r50,tiny"), 8)
    with pytest.raises(ValueError, match="mit_b0 .default. or r50"):
        load_config("synthetic.py", "backbone=r101")
