"""The one place that imports torchaudio.

Every torchaudio wheel on PyPI is linked against CUDA, so on a CPU-only torch
``import torchaudio`` fails while loading its compiled extension. signalcraft needs only
the pure-torch parts (``transforms.MelSpectrogram``, ``transforms.AmplitudeToDB``,
``functional.resample``), which work without that extension. On that specific failure we
register a stand-in for ``torchaudio._extension`` that reports the extension absent, and
import again. With a CUDA torch (what ``pip install torch`` gives on Linux) the first
import simply succeeds.

Audio files are read and written with soundfile instead of ``torchaudio.load/save``,
which would need torchcodec (also CUDA-linked on PyPI).
"""

from __future__ import annotations

import sys
import types


def _import_torchaudio():
    try:
        import torchaudio
    except OSError:
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchaudio._extension")
        stub._IS_TORCHAUDIO_EXT_AVAILABLE = False
        stub._IS_ALIGN_AVAILABLE = False
        stub._load_lib = lambda name: False
        stub.fail_if_no_align = lambda func: func
        sys.modules["torchaudio._extension"] = stub
        import torchaudio
    return torchaudio


torchaudio = _import_torchaudio()
