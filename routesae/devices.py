"""Which torch device a command runs on: ``--device`` checked before any model loads.

``torch.device("bogus")`` fails deep inside a model load with a traceback, and ``cuda`` on a machine
without one fails later still; every stage resolves its device here first, so a wrong one is a
one-line error naming the option.
"""

from __future__ import annotations

import torch

from routesae.errors import ConfigError

AUTO = "auto"


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``auto`` (or None): CUDA when available, else the CPU; otherwise the named device, checked to exist here."""
    if spec is None or spec == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {spec} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: this machine has no CUDA GPU (torch sees none); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {spec}: MPS is not available on this machine; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {spec}: routesae runs on cpu, cuda or mps devices")
    return device
