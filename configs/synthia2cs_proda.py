"""SYNTHIA -> Cityscapes: ProDA (55.5 mIoU over 16 classes, 62.0 over 13) on DeepLabV2-ResNet-101.

  python -m pipa_jax.proda run --config configs/synthia2cs_proda.py --workdir runs/proda_synthia \
      --config.data.source_root=/data/synthia --config.data.target_root=/data/cityscapes \
      --config.model.pretrained=resnet101-imagenet.pth

Options and recipe as configs/gta2cs_proda.py (stage=warmup|stage1|stage2|stage3,
warmup=adversarial|source_only, kd_bug, smoke), with the official SYNTHIA differences: the
SYNTHIA-RAND-CITYSCAPES frames (1280x760) resized to the RandomSized mean (2200 wide), and no
MRKLD regulariser in stage 1 (--regular_w 0). The official run trains 16 output classes; the
model here keeps the 19 Cityscapes classes (SYNTHIA labels none of the other three) and reports
mIoU over 19, 16 and 13 of them from one confusion matrix.
"""
from pipa_jax import config as config_lib

_proda = config_lib.sibling_config(__file__, "gta2cs_proda.py")


def get_config(arg: str = ""):
    return _proda.build("synthia", (2200, 1306), arg, regular_weight=0.0, miou_subsets=(19, 16, 13))
