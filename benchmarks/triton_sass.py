"""Static report of the Triton KD kernel, compiled for a Hopper GPU (sm_90) on a machine without one.

    python benchmarks/triton_sass.py --json sass.json

For every divergence and both pass-1 variants (one running maximum per lane, or per row with
``tile_max``), compiles ``triton_kd._kd_kernel`` for sm_90 with the launch settings
``kd_rows_and_grad`` uses, and reads the machine code with the CUDA tools that Triton ships
(cuobjdump, nvdisasm): registers per thread, local memory (spills), and the number of
exponentials (``MUFU.EX2``) and instructions in the whole kernel. These are counts, not times: they
tell which variant does less work per entry, and that it compiles for the GPU at all (Triton's CPU
interpreter, which the tests use, accepts programs the GPU compiler rejects). Times come from
``benchmarks/kd_loss.py`` on a GPU.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure  # noqa: E402


def compile_kernel(divergence, tile_max, same_t=True, dtype="bf16", arch=90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from distill_plugins import triton_kd

    block, warps = triton_kd.launch_settings(divergence)
    ptr = f"*{dtype}"
    signature = {"S": ptr, "T": ptr, "Y": "*i64", "G": ptr, "KD": "*fp32", "CE": "*fp32", "stride_s": "i64",
                 "stride_t": "i64", "stride_g": "i64", "V": "i32", "inv_temp": "fp32", "kd_ratio": "fp32",
                 "coef": "fp32", "DIV": "constexpr", "SAME_T": "constexpr", "BLOCK": "constexpr", "TILE": "constexpr"}
    constants = {"DIV": triton_kd.DIVERGENCE_IDS[divergence], "SAME_T": same_t, "BLOCK": block, "TILE": tile_max}
    src = ASTSource(fn=triton_kd._kd_kernel, signature=signature, constexprs=constants)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def cuda_tool(name):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.isfile(path):
        sys.exit(f"triton_sass: error: {path} is missing; this Triton has no CUDA tools, install the CUDA wheel of triton")
    return path


def report(kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuda_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuda_tool("nvdisasm"), f.name], capture_output=True, text=True, check=True).stdout
    field = lambda key: int(re.search(rf"\b{key}:(\d+)", usage).group(1))  # noqa: E731
    code = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    return {"registers": field("REG"), "local_bytes": field("LOCAL"), "shared_bytes": field("SHARED"),
            "ex2": sum("MUFU.EX2" in line for line in code), "instructions": len(code)}


def main(argv=None):
    from distill_plugins import triton_kd

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--divergences", default=",".join(triton_kd.DIVERGENCE_IDS))
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--temperature-one", choices=["yes", "no", "both"], default="yes",
                    help="compile for T = 1 (the CE shares the KD softmax), T != 1, or both")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if triton_kd.triton is None:
        sys.exit("triton_sass: error: triton is not installed (scripts/setup_env.sh installs it)")
    same = {"yes": [True], "no": [False], "both": [True, False]}[args.temperature_one]
    rows = []
    for divergence in [d.strip() for d in args.divergences.split(",") if d.strip()]:
        if divergence not in triton_kd.DIVERGENCE_IDS:
            sys.exit(f"triton_sass: error: --divergences: unknown {divergence}; choose from {', '.join(triton_kd.DIVERGENCE_IDS)}")
        block, warps = triton_kd.launch_settings(divergence)
        for same_t in same:
            for tile_max in (False, True):
                r = report(compile_kernel(divergence, tile_max, same_t, args.dtype))
                rows.append({"divergence": divergence, "pass1_max": "per row" if tile_max else "per lane",
                             "temperature_one": same_t, "block": block, "num_warps": warps,
                             "launch": f"{block} x {warps}", **r})
    print(f"triton_kd._kd_kernel for sm_90, {args.dtype} logits (static counts of the compiled code, no GPU)\n")
    print(measure.markdown_table(rows, [
        ("divergence", "divergence", None), ("pass-1 maximum", "pass1_max", None), ("T = 1", "temperature_one", None),
        ("BLOCK x warps", "launch", None), ("registers", "registers", None), ("local bytes", "local_bytes", None),
        ("MUFU.EX2", "ex2", None), ("instructions", "instructions", None),
    ]))
    measure.write_json(args.json, {"benchmark": "triton_sass", "arch": "sm_90", "dtype": args.dtype, "results": rows})
    return rows


if __name__ == "__main__":
    main()
