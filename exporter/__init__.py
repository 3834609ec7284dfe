"""rwkv_export: RWKV checkpoints -> ONNX (step and sequence graphs) with the manifest as contract."""

from pathlib import Path

__version__ = "0.1.0"

DEFAULT_MODEL = Path(__file__).parent / "default_model" / "tiny-rwkv4-pystdlib.pth"


def default_checkpoint() -> Path:
    """The tiny RWKV-4 this project trains itself (scripts/train_default.py) and ships."""
    return DEFAULT_MODEL
