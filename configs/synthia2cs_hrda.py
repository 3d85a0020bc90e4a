"""SYNTHIA -> Cityscapes with HRDA, HRDA + PiPa and the source-only baseline.

  python -m pipa_jax.main --config configs/synthia2cs_hrda.py:method=pipa --workdir runs/synthia2cs_hrda_pipa \
      --config.data.source_root=/data/synthia --config.data.target_root=/data/cityscapes \
      --config.model.pretrained=pretrained/mit_b5
  python -m pipa_jax.evaluate --workdir runs/synthia2cs_hrda_pipa     # mIoU (19), mIoU16, mIoU13
Prepare the roots once: python -m pipa_jax.tools.prepare_data synthia /data/synthia (and cityscapes).

Variants and the recipe as configs/gta2cs_hrda.py (method=hrda|pipa|source_only, smoke), whose
docstring lists every difference from the official code and why. What is specific to SYNTHIA:
SYNTHIA-RAND-CITYSCAPES (1280x760) is resized into 2560x1520 (2x), and results are reported as
mIoU over 16 and 13 classes besides 19 (published: HRDA 65.8 / 72.4, HRDA + PiPa 68.2 / 74.8).
"""
from pipa_jax import config as config_lib

_hrda = config_lib.sibling_config(__file__, "gta2cs_hrda.py")


def get_config(arg: str = ""):
    c = _hrda.build_hrda("synthia", (2560, 1520), arg)
    c.eval.miou_subsets = (19, 16, 13)
    return c
