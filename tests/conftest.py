import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
# One XLA compilation cache for the whole test session: the xdist workers, the notebooks'
# kernels and the child interpreters (all inherit the environment) compile many of the
# same programs (real tiny.en's decoder, the attribution passes), and on CPU compiling is
# most of a small test's time (an AttnLRP pass of a 2-layer Whisper: 16 s cold, 5 s from
# the cache). Executables are looked up by a hash of the program, compiler and flags, so
# results are bit-identical to a fresh compile.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "jaxspeech-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Parity is measured at full float32 matmul precision, and silent broadcasting
# between ranks is a bug we want to see (equinox's convention).
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
