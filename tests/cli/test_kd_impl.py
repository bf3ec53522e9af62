"""--kd-impl chunked and fused, and a compiled teacher (--teacher-compile), train exactly like plain
through the real fairseq-train."""
import re

from conftest import train

UPDATE = re.compile(r"num_updates=(\d+)")


def updates(log):
    """{update: (loss, nll_loss, kd_loss, gnorm)} from fairseq's per-update log lines."""
    out = {}
    for line in log.splitlines():
        m = UPDATE.search(line)
        if m and "train_inner" in line:
            fields = dict(re.findall(r"(\w+)=([-\d.e]+)", line))
            out[int(m.group(1))] = tuple(float(fields[k]) for k in ("loss", "nll_loss", "kd_loss", "gnorm"))
    return out


def test_chunked_and_fused_give_plain_updates(data_bin, teacher_ckpt, tmp_path):
    runs = {}
    for name in ("plain", "chunked", "fused", "fused+compiled_teacher"):
        impl, _, compiled = name.partition("+")
        # chunks of 7 tokens: several chunks per batch, the last one partial
        proc = train(data_bin, tmp_path / impl, "--criterion", "kd", "--teacher-path", teacher_ckpt,
                     "--kd-impl", impl, "--kd-chunk-size", "7", "--no-save",
                     *(["--teacher-compile"] if compiled else []), max_update=2)
        runs[name] = updates(proc.stdout + proc.stderr)
    assert sorted(runs["plain"]) == [1, 2]
    for impl in ("chunked", "fused", "fused+compiled_teacher"):
        for update in (1, 2):  # update 2 depends on update 1's gradients
            for ours, plain in zip(runs[impl][update], runs["plain"][update]):
                assert abs(ours - plain) <= 2e-3 + 1e-3 * abs(plain), (impl, update, runs[impl], runs["plain"])
