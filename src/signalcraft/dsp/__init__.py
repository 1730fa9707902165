"""The signal stages of the chain, one small protocol (``Stage``).

A stage maps audio to audio of the same shape, float32 ``(channels, samples)`` (the
log-mel stage maps to tensors), and never changes its input. A stage may carry state
from one segment to the next (an adaptive filter's weights, the gate's context from the
end of the previous segment), because `record` delivers gapless segments; ``reset()``
forgets it, and the chain calls it whenever a segment does not follow on from the
previous one (a reconnect, a dropped segment, another file).

- ``canceller``: reference-microphone noise cancellation (NLMS, RLS).
- ``gate``: spectral gating of each channel against its own noise clip (noisereduce).
- the separator (``signalcraft.separate.Separator``) and the log-mel features
  (``signalcraft.features.LogMel``) are stateless stages of the same shape; ``spatial``
  holds the multichannel Wiener filter an array separator runs on its output.

``signalcraft.chain`` composes them from the configuration and the resources that
``signalcraft.resources`` loads and checks.
"""

from __future__ import annotations

from typing import Optional, Protocol

import numpy as np


class Stage(Protocol):
    """One step of the chain."""

    def __call__(self, audio: np.ndarray, reference: Optional[np.ndarray] = None) -> np.ndarray:
        """audio: float32, shape = (channels, samples) -> the same shape. ``reference``:
        the reference microphones' audio of the same samples, shape = (references,
        samples), for the stages that use it."""

    def reset(self) -> None:
        """Forget the state carried from the previous segment."""
