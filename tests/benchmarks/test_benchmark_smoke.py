"""Both benchmarks run at tiny size on CPU and report their figures (not how fast they are)."""
import json
import os
import sys

from conftest import REPO, run


def bench(script, tmp_path, *args):
    out = tmp_path / (script + ".json")
    proc = run([sys.executable, os.path.join(REPO, "benchmarks", script + ".py"), "--device", "cpu",
                "--preset", "cpu-tiny", "--json", out, *args])
    return json.load(open(out)), proc.stdout


def positive(x):
    return isinstance(x, (int, float)) and x > 0


def test_kd_loss_benchmark_reports_every_implementation(tmp_path):
    data, table = bench("kd_loss", tmp_path, "--repeats", "1", "--warmup", "0", "--chunk-size", "100")
    assert set(data["results"]) == {"reference", "plain", "chunked", "fused"}
    for impl, res in data["results"].items():
        for key in ("time_ms", "cpu_ms", "peak_extra_mib", "floor_ms", "x_floor", "floor_bytes"):
            assert positive(res[key]), (impl, key, res)
    assert data["results"]["plain"]["floor_bytes"] == 256 * 1024 * 4 * 3  # N V (read + grad + teacher) fp32
    assert positive(data["ratios"]["fused/reference memory"])
    assert data["ratios"]["max loss relative difference to plain"] < 1e-5  # chunked and fused: the same loss
    assert "| fused |" in table and "x floor" in table


def test_kd_loss_benchmark_runs_the_triton_kernel_rows(tmp_path):
    """The GPU rows (the Triton kernel, both pass-1 variants) in Triton's interpreter (set by conftest),
    tiny: the code path the GPU run times, and the same loss as plain for a 3-pass divergence."""
    data, _ = bench("kd_loss", tmp_path, "--repeats", "1", "--warmup", "0", "--tokens", "12", "--vocab", "300",
                    "--hidden", "16", "--divergence", "skew_kl", "--impls", "plain,triton,triton_tile")
    assert set(data["results"]) == {"plain", "triton", "triton_tile"}
    assert all(positive(res["time_ms"]) for res in data["results"].values())
    assert data["ratios"]["max loss relative difference to plain"] < 1e-5


def test_activation_benchmark_compares_fused_gelu_with_fairseqs(tmp_path):
    data, table = bench("activation", tmp_path, "--repeats", "1", "--warmup", "0")
    assert len(data["results"]) == 4 and data["max_abs_difference"] < 1e-5  # the same function
    for res in data["results"].values():
        assert positive(res["time_ms"]) and positive(res["floor_ms"]), res
    assert positive(data["ratios"]["student forward+backward: time fused/reference"])
    assert "| teacher forward | fused |" in table


def test_attention_benchmark_compares_causal_sdpa_with_fairseqs(tmp_path):
    data, table = bench("attention", tmp_path, "--repeats", "1", "--warmup", "0")
    assert len(data["results"]) == 8 and max(data["max_abs_difference"].values()) < 1e-5  # the same function
    for res in data["results"].values():
        assert positive(res["time_ms"]) and positive(res["tokens_per_s"]) and positive(res["peak_extra_mib"]), res
    assert positive(data["ratios"]["student forward+backward, padded: memory ours/fairseq"])
    assert "| teacher forward, padded | ours |" in table


def test_triton_kernel_compiles_for_hopper_without_spills(tmp_path):
    """benchmarks/triton_sass.py: every divergence's kernel, both pass-1 variants, compiled for sm_90
    (the GPU compiler, not the interpreter the kernel tests use); no local memory; one running
    maximum per row does fewer exponentials than one per lane."""
    out = tmp_path / "sass.json"
    proc = run([sys.executable, os.path.join(REPO, "benchmarks", "triton_sass.py"), "--json", out])
    rows = json.load(open(out))["results"]
    assert len(rows) == 12 and "| forward_kl | per lane |" in proc.stdout
    for row in rows:
        assert row["local_bytes"] == 0 and 0 < row["registers"] <= 255 and row["ex2"] > 0, row
    by = {(r["divergence"], r["pass1_max"]): r for r in rows}
    for name in {r["divergence"] for r in rows}:
        assert by[(name, "per row")]["ex2"] < by[(name, "per lane")]["ex2"], name


def test_kd_step_benchmark_reports_ours_and_reference(tmp_path):
    profile = tmp_path / "profile.txt"
    data, table = bench("kd_step", tmp_path, "--steps", "1", "--warmup", "0", "--kd-impl", "fused",
                        "--run", "ours,cached,teacher,student,reference", "--teacher-cache-k", "16",
                        "--profile", str(profile))
    results = data["results"]
    assert set(results) == {"ours", "cached", "teacher", "student", "reference"}
    cached = results["cached"]
    assert cached["teacher_cache_k"] == 16 and not cached["teacher_in_step"] and positive(cached["cache_build_s"])
    assert positive(data["ratios"]["tokens_per_s cached/reference"])
    assert results["ours"]["kd_impl"] == "fused"
    for name, res in results.items():
        for key in ("tokens_per_s", "step_s", "cpu_s", "mfu", "peak_gib"):
            assert positive(res[key]), (name, key, res)
        if name not in ("teacher", "student"):
            assert res["teacher_params"] > res["student_params"] > 0
    # the parts: each model alone, and a split that adds up to ours' step
    assert results["teacher"]["student_params"] == 0 and results["teacher"]["teacher_params"] == results["ours"]["teacher_params"]
    assert results["student"]["teacher_params"] == 0 and results["student"]["student_params"] == results["ours"]["student_params"]
    split = data["split"]
    assert split["teacher_forward_s"] == results["teacher"]["step_s"] and split["student_step_s"] == results["student"]["step_s"]
    assert abs(sum(split.values()) - results["ours"]["step_s"]) < 1e-9
    assert not any(k.startswith(("tokens_per_s teacher", "tokens_per_s student")) for k in data["ratios"])
    assert "aten::" in profile.read_text() and "split of ours'" in table
    for key in ("tokens_per_s ours/reference", "step_s ours/reference", "mfu ours/reference",
                "peak_memory ours/reference"):
        assert positive(data["ratios"][key])
    assert "| ours |" in table and "| reference |" in table


def test_generation_benchmark_reports_prefill_and_reference(tmp_path):
    data, table = bench("generation", tmp_path, "--repeats", "1", "--warmup", "0")
    assert set(data["results"]) == {"reference", "prefill"}
    assert data["results"]["prefill"]["generator"] == "PrefillGenerator"
    for name, res in data["results"].items():
        for key in ("tokens", "tokens_per_s", "responses_per_s", "wall_s", "cpu_s", "peak_extra_mib"):
            assert positive(res[key]), (name, key, res)
    assert data["same_outputs"] is True  # greedy: both generators produce the same tokens
    assert data["results"]["prefill"]["tokens"] == data["results"]["reference"]["tokens"]
    for key in ("tokens_per_s prefill/reference", "wall_s prefill/reference", "peak_memory prefill/reference"):
        assert positive(data["ratios"][key])
    assert "| prefill |" in table and "| reference |" in table


def test_minillm_terms_benchmark_reports_fused_and_plain(tmp_path):
    data, table = bench("minillm_terms", tmp_path, "--repeats", "1", "--warmup", "0")
    assert set(data["results"]) == {"plain", "fused"}
    for name, res in data["results"].items():
        for key in ("step_s", "cpu_s", "tokens_per_s", "peak_extra_mib"):
            assert positive(res[key]), (name, key, res)
    for term in ("reg_loss", "pt_loss"):  # the same loss on both paths
        assert abs(data["results"]["fused"][term] - data["results"]["plain"][term]) <= 1e-5 * abs(data["results"]["plain"][term])
    assert positive(data["ratios"]["peak_memory fused/plain"]) and "| fused |" in table


def test_ot_terms_benchmark_reports_ours_and_reference(tmp_path):
    data, table = bench("ot_terms", tmp_path, "--repeats", "1", "--warmup", "0")
    assert set(data["results"]) == {"reference", "ours"}
    for name, res in data["results"].items():
        for key in ("step_s", "cpu_s", "tokens_per_s", "peak_extra_mib"):
            assert positive(res[key]), (name, key, res)
    assert positive(data["ratios"]["tokens_per_s ours/reference"])
    assert data["ratios"]["max relative difference of the terms"] < 1e-3  # the same terms (Sinkhorn's tolerance)
    assert "| ours |" in table and "| reference |" in table


def test_cross_tokenizer_benchmark_reports_every_form(tmp_path):
    data, table = bench("cross_tokenizer_loss", tmp_path, "--repeats", "1", "--warmup", "0", "--kd-chunk-size", "64")
    criteria = ("uld", "min_ed", "dskd_cma", "multi_cost_ot")
    assert set(data["results"]) == {f"{c} {i}" for c in criteria for i in ("plain", "chunked", "fused")}
    for name, res in data["results"].items():
        for key in ("step_s", "cpu_s", "tokens_per_s", "peak_extra_mib"):
            assert positive(res[key]), (name, key, res)
    for c in criteria:
        assert positive(data["ratios"][f"{c} fused/plain peak_memory"])
        assert data["ratios"][f"{c} fused loss relative difference"] < 1e-5  # the same loss in every form
    assert "| uld | fused |" in table


def test_alignment_benchmark_reports_the_same_alignments(tmp_path):
    out = tmp_path / "alignment.json"
    proc = run([sys.executable, os.path.join(REPO, "benchmarks", "alignment.py"), "--preset", "tiny", "--repeats", "1",
                "--json", out])
    data = json.load(open(out))
    assert data["same"] is True and positive(data["ratio"])
    assert all(positive(r["tokens_per_s"]) for r in data["results"].values())
    assert "| ours |" in proc.stdout
