"""Test setup: 8 fake CPU devices and one XLA compilation cache for the whole session, set
before JAX initialises its backends."""
import atexit
import os
import shutil
import tempfile

# --xla_backend_optimization_level=0: LLVM compiles the tests' programs without its optimisation
# passes. The tests run a few steps of tiny models, so compile time is most of their time; measured
# on the tiny PiPa + MIC train step (2-core EPYC): compile 142 -> 102 s, the step 1.0 -> 2.5 s, the
# same loss to 7 digits. The XLA (HLO) optimisations, and so the numerics, are unchanged.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the session, holding every program (min compile time 0):
# the environment reaches the pytest-xdist workers and every CLI subprocess the tests start, so a
# program compiled once (a train step, an eval step, the ~130 small programs of building a model
# eagerly, 0.1-0.6 s each here) is loaded everywhere else. The process that makes it removes it.
if "PIPA_JAX_TEST_XLA_CACHE" not in os.environ:
    os.environ["PIPA_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="pipa_jax_tests_xla_")
    atexit.register(shutil.rmtree, os.environ["PIPA_JAX_TEST_XLA_CACHE"], ignore_errors=True)
XLA_CACHE = os.environ["PIPA_JAX_TEST_XLA_CACHE"]
os.environ["JAX_COMPILATION_CACHE_DIR"] = XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402  (must come after the environment is set)
import pytest  # noqa: E402

# No matmul-precision override: XLA:CPU computes float32 products in float32, and an override
# would change the compiled programs' cache keys, so in-process tests could not reuse the train
# step that the CLI tests compiled into the shared compilation cache.


@pytest.fixture(scope="session")
def xla_cache_dir():
    """The session's compilation cache (see above), for configs' compilation_cache_dir."""
    return XLA_CACHE


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


# Test files that start several training processes at once are put first in the collection. Under
# `pytest -n 2 --dist loadfile`, pytest-xdist 3.8 then hands files out by their number of tests
# (its default --loadscope-reorder), so this order holds for plain pytest and among files of equal
# size only. Handing the longest files out first (--no-loadscope-reorder) was measured and not
# kept: 2843 s against 2709 s, with 17.3 GB in use at the peak, as two long files ran side by side.
RUN_FIRST = ("test_multihost.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in RUN_FIRST)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test file, drop JAX's in-memory caches of traced and compiled programs (the
    persistent cache on disk keeps them for reuse). A pytest-xdist worker runs many files in one
    process; without this its memory only grows (8 GB and more by the end of the suite here),
    and two such workers beside a test's training subprocesses exhausted a 24 GB CI machine."""
    yield
    import ctypes
    import gc
    jax.clear_caches()
    gc.collect()
    try:   # glibc keeps freed heap pages; hand them back to the system
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
