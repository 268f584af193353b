"""Compile the quantized MoE GEMM for sm_90 on this machine (no GPU) and report what ptxas made of it.

    python3 scripts/sass_report.py [--gemm gate_up|down] [--bits 4|8] [--asymmetric] [CONFIG ...]

CONFIG is written the way scripts/bench_kernels.py prints one, e.g. "16x128x128 s1 w4 st3 swap int"
(BLOCK_MxBLOCK_NxBLOCK_K, split-K, warps, stages, then any of swap / int / rN for a register cap /
uN for K tiles per iteration / sub / join, see GemmConfig). For each it prints the registers per thread,
bytes of local memory (spills), the programs per SM the registers allow on an H100, and the instruction
count, the MMAs and wgmma waits and the mix of the K loop's body (the SASS between the longest backward
branch and its target). Triton's bundled ptxas, cuobjdump and nvdisasm do the work; the pointers, strides,
N and K get the divisibility by 16 that Triton gives them at launch, without which the loads are not
pipelined.
"""

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triton_kernels import _qgemm  # noqa: E402
from triton_kernels.configs import GemmConfig  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
REGISTERS_PER_SM = 65536
DEFAULT_CONFIGS = ("16x128x128 s1 w4 st3 swap int r128 u2", "16x128x128 s1 w4 st3 swap int sub",  # Mixtral decode
                   "128x128x128 s1 w4 st3 swap", "128x128x64 s1 w8 st3 join")  # Mixtral at 4096 tokens
GROUP_SIZE = 128


def parse_config(text: str) -> GemmConfig:
    """GemmConfig from configs.config_text's format."""
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+) s(\d+) w(\d+) st(\d+)((?: \w+)*)", text.strip())
    if not m:
        raise SystemExit(f"config {text!r}: expected e.g. '16x128x128 s1 w4 st3 swap int'")
    bm, bn, bk, sk, w, st = map(int, m.groups()[:6])
    flags = m.group(7).split()
    regs = [int(f[1:]) for f in flags if re.fullmatch(r"r\d+", f)]
    unroll = [int(f[1:]) for f in flags if re.fullmatch(r"u\d+", f)]
    return GemmConfig(bm, bn, bk, sk, 8, w, st, "swap" in flags, "int" in flags, regs[0] if regs else None,
                      unroll[0] if unroll else 1, "sub" in flags, "join" in flags)


def compile_gemm(cfg: GemmConfig, gemm: str, bits: int, symmetric: bool):
    """triton.compile of _qgemm_kernel as fused_moe launches it for this GEMM (bf16, groups of 128)."""
    kernel = _qgemm._qgemm_kernel
    names = [p.name for p in kernel.params]
    gate_up = gemm == "gate_up"
    pointers = {"a_ptr": "*bf16", "w_ptr": "*i16" if bits == 4 else "*u8", "s_ptr": "*fp16", "z_ptr": "*u8",
                "c_ptr": "*bf16" if gate_up else "*fp32", "topk_w_ptr": "*fp32", "sorted_ids_ptr": "*i32",
                "block_expert_ptr": "*i32", "num_padded_ptr": "*i32"}
    constexprs = {
        "bias_ptr": None, "BITS": bits, "GROUP_K": GROUP_SIZE, "OFFSET": 128.0 if bits == 4 else 0.0,
        "ZERO": 1 << (bits - 1) if symmetric else -1,
        "EPILOGUE": _qgemm.EPILOGUE_SILU_MUL if gate_up else _qgemm.EPILOGUE_WEIGHTED_SUM,
        "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
        "BLOCK_K": _qgemm.block_k_for(GROUP_SIZE, False, bits, cfg.block_k), "SPLIT_K": cfg.split_k,
        "GROUP_M": cfg.group_m, "SWAP_AB": cfg.swap_ab, "INT_MMA": cfg.int_mma, "K_UNROLL": cfg.k_unroll,
        "UNPACK_ASM": True, "EVEN_K": True, "JOIN_SLICES": cfg.join_slices,
        "SUB_ZERO": cfg.sub_zero,
    }
    if gate_up:
        constexprs["topk_w_ptr"] = None
    missing = set(constexprs) - set(names)
    if missing:
        raise SystemExit(f"_qgemm_kernel has no parameters {sorted(missing)}: update this script")
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    divisible = [n for n in names if signature[n].startswith("*")
                 or n in ("N", "K", "K_PADDED") or n.startswith("stride_")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constexprs.items()}, attrs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.max_regs:
        options["maxnreg"] = cfg.max_regs
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def loop_body(sass: str) -> list[str]:
    """Instructions (opcode with modifiers) of the longest loop: from a backward branch's target label to the branch."""
    ops, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*);", line)
        if ins:
            for name in pending:
                labels[name] = len(ops)
            pending = []
            ops.append((ins.group(1), ins.group(2)))
    loops = []
    for i, (op, rest) in enumerate(ops):
        target = re.search(r"(\.L_x_\d+)", rest)
        if op.startswith("BRA") and target and labels.get(target.group(1), i) < i:
            loops.append((labels[target.group(1)], i))
    if not loops:
        return []
    start, end = max(loops, key=lambda span: span[1] - span[0])
    return [op for op, _ in ops[start:end + 1]]


def report(cfg_text: str, gemm: str, bits: int, symmetric: bool) -> str:
    cfg = parse_config(cfg_text)
    compiled = compile_gemm(cfg, gemm, bits, symmetric)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([BIN / "nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    programs = REGISTERS_PER_SM // (regs * 32 * cfg.num_warps)
    body = loop_body(sass)
    counts = collections.Counter(op.split(".")[0] for op in body)
    mix = ", ".join(f"{op} {n}" for op, n in counts.most_common(10))
    mma = counts["HGMMA"] + counts["IMMA"] + counts["HMMA"]
    waits = sum(op.startswith("WARPGROUP.DEPBAR") for op in body)
    return f"| {cfg_text} | {regs} | {local} | {programs} | {len(body)} | {mma} / {waits} | {mix} |"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS))
    ap.add_argument("--gemm", choices=("gate_up", "down"), default="gate_up")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--asymmetric", action="store_true", help="zero points loaded per group (default: symmetric)")
    args = ap.parse_args()
    print(f"{args.gemm} GEMM, int{args.bits}, {'asymmetric' if args.asymmetric else 'symmetric'}, bf16 activations, "
          f"groups of {GROUP_SIZE}, sm_90, triton {triton.__version__}")
    print("| config | registers | local bytes | programs/SM (registers) | loop instructions | MMAs / wgmma waits "
          "| top opcodes |")
    print("|---|---|---|---|---|---|---|")
    for text in args.configs:
        print(report(text, args.gemm, args.bits, not args.asymmetric))


if __name__ == "__main__":
    main()
