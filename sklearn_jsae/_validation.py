"""Cross-parameter checks and device resolution (no torch import here)."""

from __future__ import annotations

def check_k(k: int, n_components: int, name: str = "n_components") -> None:
    if k > n_components:
        raise ValueError(
            f"k={k} must be <= {name}={n_components}: each sample keeps k of the {name} latents. "
            f"Lower k or raise {name}."
        )


def resolve_device(device: str) -> str:
    """'cpu' | 'cuda' | 'auto' -> 'cpu' or 'cuda'."""
    from ._backend.mlp import cuda_available

    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise ValueError(
            "device='cuda' but torch.cuda.is_available() is False on this machine; "
            "use device='cpu' or device='auto'."
        )
    return device
