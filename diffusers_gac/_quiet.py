"""Import diffusers' quantizer table without the noise its optional backends make on import.

With bitsandbytes or torchao installed, importing ``diffusers.quantizers`` logs warnings about optional kernels
those packages cannot find (``kernels``, CUDA-only extensions); none concern diffusers-gac. They are silenced for
the duration of that one import; later warnings of the same loggers come through as usual.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

NOISY_IMPORT_LOGGERS = ("bitsandbytes", "torchao", "torch.utils._pytree", "diffusers.quantizers", "transformers")


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
