"""Compile a Triton kernel for Hopper (sm_90) without a GPU and read what the compiler made."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100_SMEM_BYTES = 232448  # 227 KiB: the most dynamic shared memory one block may take on sm_90


def compile_sm90(fn, types: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                 divisible: tuple = ()):
    """``types``: a type string ("*fp16", "i32", ...) for every runtime argument of ``fn``.

    As triton's launcher does at run time, integer arguments equal to 1 may be passed in
    ``constexprs`` (specialised away), and ``divisible`` names the arguments known to be
    multiples of 16 (pointers aligned to 16 bytes, strides of whole rows).
    """
    while not isinstance(fn, triton.runtime.JITFunction):  # unwrap autotuners and heuristics
        fn = fn.fn
    signature = {}
    for name, param in zip(fn.arg_names, fn.params):
        signature[name] = "constexpr" if param.is_constexpr or name in constexprs else types[name]
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in constexprs]
    assert not missing, f"constexprs not given: {missing}"
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_report(kernel) -> dict:
    """Registers, spill bytes and stack frame from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path  # the ptxas triton itself used for this target
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    num = lambda pat: sum(int(x) for x in re.findall(pat, text))
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame"),
            "text": text}
