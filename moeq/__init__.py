"""moeq: a quantizer for Mixture-of-Experts language models."""

__version__ = "0.1.0"


def load(path, device: str = "cpu", dtype=None, kernels: bool | None = None):
    """A runnable transformers model from a moeq (GPTQ, compressed-tensors or plain) checkpoint folder:
    dequantized once on the CPU; on CUDA, quantized modules run on moeq's Triton kernels."""
    from moeq.loader import load as _load

    return _load(path, device, dtype, kernels)
