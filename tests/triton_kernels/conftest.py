"""Run the Triton kernels under the interpreter when there is no GPU (CI), with small shapes.

Triton 3.9's interpreter stores bfloat16 as uint16 (numpy has none) and (1) multiplies bf16 dot
operands as those raw bits, (2) rounds float32 -> bfloat16 toward zero where the GPU rounds to
nearest even, (3) casts integers to bfloat16 by writing the integer into the uint16 bits,
(4) adds, subtracts and multiplies bfloat16 tensors as uint16 integers. The patches below upcast dot operands to float32 (exact) and round to nearest even,
so the bf16 kernels compute on CPU what they compute on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import triton.language as tl  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime import interpreter as _interp

    _create_dot = _interp.InterpreterBuilder.create_dot

    def _upcast_bf16(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = _interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return _interp.TensorHandle(data, tl.float32)

    def _create_dot_bf16(self, a, b, d, *args, **kwargs):
        return _create_dot(self, _upcast_bf16(a), _upcast_bf16(b), d, *args, **kwargs)

    _cast_impl = _interp.InterpreterBuilder.cast_impl

    def _cast_impl_rtne(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar.is_int():
            src = _cast_impl(self, src, tl.float32)
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            u = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round half to even on the dropped 16 bits
            return _interp.TensorHandle(u.astype(np.uint16), tl.bfloat16)
        return _cast_impl(self, src, dst_type)

    def _bf16_arith(name):
        original = getattr(_interp.InterpreterBuilder, name)

        def op(self, lhs, rhs):
            if lhs.dtype.scalar != tl.bfloat16:
                return original(self, lhs, rhs)
            out = original(self, _upcast_bf16(lhs), _upcast_bf16(rhs))  # exact inputs, fp32 result
            return _cast_impl_rtne(self, out, tl.bfloat16)

        setattr(_interp.InterpreterBuilder, name, op)

    _interp.InterpreterBuilder.create_dot = _create_dot_bf16
    _interp.InterpreterBuilder.cast_impl = _cast_impl_rtne
    for _name in ("create_fadd", "create_fsub", "create_fmul"):
        _bf16_arith(_name)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
