"""``--device`` options: one parser, one-line errors instead of torch's tracebacks."""
import torch

from .errors import DistillError

CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str, flag: str = "--device") -> torch.device:
    """The device ``spec`` names: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda`` or
    ``cuda:N``; a one-line DistillError for another name, CUDA that is not there, or an index past
    the visible GPUs."""
    spec = str(spec).strip()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DistillError(f"{flag} {spec} is not a device this command runs on; use {CHOICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DistillError(f"{flag} {spec}: {why}; use {flag} cpu (or auto)")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise DistillError(f"{flag} {spec}: only {n} CUDA device{'s' if n > 1 else ''} visible "
                               f"(cuda:0 to cuda:{n - 1}); pick one of them")
    return device
