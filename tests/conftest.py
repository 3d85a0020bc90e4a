"""Test setup: 8 fake CPU devices, set before JAX initialises its backends."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after the environment is set)

# No matmul-precision override: XLA:CPU computes float32 products in float32, and an override
# would change the compiled programs' cache keys, so in-process tests could not reuse the train
# step that the CLI tests compiled into the shared compilation cache.


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
