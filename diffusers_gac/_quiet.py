"""Import diffusers' quantizer table without the noise its optional backends make on import.

With bitsandbytes or torchao installed, importing ``diffusers.quantizers`` logs warnings about optional kernels
those packages cannot find (CUDA-only extensions, Hub kernels); none concern diffusers-gac. They are silenced for
the duration of that one import; later warnings of the same loggers come through as usual.

On a CPU with AVX512-BF16, importing bitsandbytes (the bnb and peers extras, not a plain install) asks the ``kernels`` package for a
faster 4-bit matmul from the Hub and falls back to its own when that fails. Without the Hub it warns "Failed to load
CPU gemm_4bit_forward from kernels-community" (logger ``bitsandbytes``), and with ``HF_HUB_OFFLINE=1`` ``kernels``
first warns "Skipping publisher trust check" (logger ``kernels``). ``kernels`` itself cannot be left out of an
install: transformers requires it. Nothing here can quiet an import of bitsandbytes that happens before this package
is imported (``from diffusers import ...`` first), which is why a plain install does not include bitsandbytes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

NOISY_IMPORT_LOGGERS = ("bitsandbytes", "kernels", "torchao", "torch.utils._pytree", "diffusers.quantizers",
                        "transformers")


@contextmanager
def quiet_imports(names: tuple[str, ...] = NOISY_IMPORT_LOGGERS) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
