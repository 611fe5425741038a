"""The MoE kernels compile for Hopper (sm_90) without a GPU: dots on wgmma, no register spills,
shared memory within the chip, for every autotune config and both weight layouts the ops use.

The compile runs in a subprocess because the test session runs triton in interpreter mode.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _gemm_matrix():
    from bam_kernels._triton import grouped_gemm as gg
    ints = ("M N K E M_BUCKET stride_am stride_ak stride_we stride_wn stride_wk stride_cm stride_cn "
            "stride_pm stride_qm")
    types = {n: "i32" for n in ints.split()}
    types.update(a_ptr="*bf16", w_ptr="*bf16", c_ptr="*bf16", offs_ptr="*i32", row_map_ptr="*i64",
                 scale_ptr="*fp32", pre_ptr="*bf16", part_ptr="*fp32")
    aligned = ("a_ptr w_ptr c_ptr offs_ptr row_map_ptr scale_ptr pre_ptr part_ptr stride_am stride_we "
               "stride_cm stride_pm N K")
    # (epilogue, gather, scatter, scale, weight read transposed) of every launch the ops make:
    # grouped_mm forward and dx; moe_mlp up-projection, down-projection, d(act) and dx.
    launches = [(gg.PLAIN, False, False, False, False), (gg.PLAIN, False, False, False, True),
                (gg.SWIGLU_FWD, True, False, False, False), (gg.PLAIN, False, True, True, False),
                (gg.SWIGLU_BWD, True, False, True, True), (gg.PLAIN, False, True, False, True)]
    fp32 = {n: "*fp32" if t == "*bf16" else t for n, t in types.items()}
    for ep, gather, scatter, scale, transposed in launches:
        # bf16 on the tensor-core tiles; float32 without TF32 ("ieee": FMA dots) on the fma tiles.
        for fma, dtypes, precision in ((False, types, "tf32"), (True, fp32, "ieee")):
            for cfg in gg._gemm_configs(ep, fma):
                const = dict(cfg.kwargs, A_DIV=2, GATHER_A=gather, SCATTER_C=scatter, SCALE=scale,
                             EPILOGUE=ep, STORE_PRE=ep == gg.SWIGLU_FWD, PRECISION=precision, BLOCK_G=16,
                             stride_ak=1, stride_cn=1)
                const["stride_wn" if transposed else "stride_wk"] = 1
                div = aligned.split() + ["stride_wk" if transposed else "stride_wn"]
                yield (f"group_gemm {precision} ep={ep} g={gather} s={scatter} t={transposed} {cfg.kwargs}",
                       gg._group_gemm, dtypes, const, cfg, div, not fma)


def _wgrad_matrix():
    from bam_kernels._triton import grouped_gemm as gg
    ints = "N K stride_am stride_an stride_bm stride_bk stride_de stride_dn stride_dk"
    types = {n: "i32" for n in ints.split()}
    types.update(a_ptr="*bf16", b_ptr="*bf16", dw_ptr="*bf16", offs_ptr="*i32", row_map_ptr="*i64",
                 scale_ptr="*fp32")
    div = ("a_ptr b_ptr dw_ptr offs_ptr row_map_ptr scale_ptr N K stride_am stride_bm stride_de "
           "stride_dn").split()
    fp32 = {n: "*fp32" if t == "*bf16" else t for n, t in types.items()}
    for fma, dtypes, precision in ((False, types, "tf32"), (True, fp32, "ieee")):
        for cfg in gg._wgrad_configs(fma):
            variants = [(False, False, False, False), (True, True, False, True), (False, False, True, False)]
            for gather_a, scale_a, gather_b, swiglu_b in variants:
                const = dict(cfg.kwargs, A_DIV=2, GATHER_A=gather_a, SCALE_A=scale_a, B_DIV=2,
                             GATHER_B=gather_b,
                             SWIGLU_B=swiglu_b, PRECISION=precision, stride_an=1, stride_bk=1, stride_dk=1)
                yield (f"group_wgrad {precision} ga={gather_a} sb={swiglu_b} gb={gather_b} {cfg.kwargs}",
                       gg._group_wgrad, dtypes, const, cfg, div, not fma)


def _routing_matrix():
    from bam_kernels._triton import routing as rt
    for E, k in [(8, 2), (128, 8)]:
        block_t, block_e = rt._blocks(E)
        base = dict(T="i32", E="i32", stride_t="i32", logits_ptr="*bf16", w_ptr="*fp32", idx_ptr="*i64")
        const = dict(TOP_K=k, NORMALIZE=True, BLOCK_T=block_t, BLOCK_E=block_e)
        yield (f"route_topk_fwd E={E} k={k}", rt._route_topk_fwd, base, dict(const, BLOCK_K=k), None, (),
               False)
        bwd = dict(base, dw_ptr="*fp32", dlogits_ptr="*bf16", stride_dt="i32")
        yield (f"route_topk_bwd E={E} k={k}", rt._route_topk_bwd, bwd, const, None, (), False)


def _compile_one(item):
    from tests.support.sm90 import compile_sm90, ptxas_report
    name, fn, types, const, cfg, div, has_dot = item
    warps, stages = (cfg.num_warps, cfg.num_stages) if cfg else (4, 3)
    kernel = compile_sm90(fn, types, const, warps, stages, divisible=tuple(div))
    rep = ptxas_report(kernel)
    return {"name": name, "wgmma": "wgmma" in kernel.asm["ptx"], "has_dot": has_dot,
            "shared": kernel.metadata.shared, "spill_stores": rep["spill_stores"],
            "spill_loads": rep["spill_loads"], "registers": rep["registers"]}


def _compile_all():
    from concurrent.futures import ThreadPoolExecutor
    items = [item for matrix in (_gemm_matrix, _wgrad_matrix, _routing_matrix) for item in matrix()]
    # Compiling is mostly ptxas and LLVM in native code: threads overlap it on the CI's 2 cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(_compile_one, items))


@pytest.mark.slow
def test_moe_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(HERE))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) >= 40
    from tests.support.sm90 import H100_SMEM_BYTES
    for r in results:
        if r["has_dot"]:
            assert r["wgmma"], f"{r['name']}: no wgmma in the PTX"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{r['name']}: spills {r}"
        assert 0 < r["registers"] <= 255, r
        assert r["shared"] <= H100_SMEM_BYTES, f"{r['name']}: {r['shared']} bytes of shared memory"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    print(json.dumps(_compile_all()))
