"""fairseq_distill_startup: fairseq starts without scikit-learn and scipy.stats, and what fairseq binds
from them still computes the real values. Each check runs in a fresh interpreter of this .venv (whose
.pth file, written by scripts/setup_env.sh, installs the finder at start-up)."""
import json
import os
import subprocess
import sys

import pytest

DEFAULT_RUN = r"""
import json, sys
import numpy as np
import fairseq_cli.train  # imports every fairseq task and criterion
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("sklearn", "scipy"))
from fairseq.criterions import sentence_prediction as sp
from fairseq.tasks import audio_classification as ac
bound = [type(f).__name__ for f in (sp.f1_score, sp.pearsonr, ac.sklearn_metrics)]
preds, labels = np.array([1, 0, 1, 1, 0, 1]), np.array([1, 0, 0, 1, 1, 1])
x, y = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([1.5, 1.0, 4.0, 3.0, 6.0])
got = dict(acc_f1=sp.acc_and_f1(preds, labels)["f1"], mcc=sp.matthews_corrcoef(preds, labels),
           corr=sp.pearson_and_spearman(x, y), fpr=ac.sklearn_metrics.roc_curve(labels, x[[0, 1, 2, 3, 4, 0]])[0].tolist())
import scipy.special, scipy.stats, sklearn.linear_model, sklearn.metrics  # the real modules import afterwards
want = dict(acc_f1=sklearn.metrics.f1_score(labels, preds), mcc=sklearn.metrics.matthews_corrcoef(labels, preds),
            corr=dict(pearson=scipy.stats.pearsonr(x, y)[0], spearmanr=scipy.stats.spearmanr(x, y)[0]),
            fpr=sklearn.metrics.roc_curve(labels, x[[0, 1, 2, 3, 4, 0]])[0].tolist())
got["corr"] = {k: got["corr"][k] for k in want["corr"]}
print(json.dumps(dict(loaded=loaded, bound=bound, got=got, want=want, real=type(sklearn.metrics).__name__), default=float))
"""

BOUND_F1 = r"""
import sys
{pre}
import fairseq_cli.train
from fairseq.criterions import sentence_prediction as sp
print(type(sp.f1_score).__name__, type(sp.pearsonr).__name__, "sklearn" in sys.modules)
"""


def _python(code, **env):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_fairseq_starts_without_sklearn_and_the_deferred_metrics_are_real():
    out = json.loads(_python(DEFAULT_RUN))
    assert out["loaded"] == [], f"imported at fairseq start-up: {out['loaded'][:5]}"
    assert out["bound"] == ["_Deferred"] * 3
    assert out["got"]["fpr"] == out["want"]["fpr"]
    for key in ("acc_f1", "mcc"):
        assert out["got"][key] == pytest.approx(out["want"][key], rel=1e-12)
    assert out["got"]["corr"] == pytest.approx(out["want"]["corr"], rel=1e-12)
    assert out["real"] == "module"


def test_eager_imports_switch_turns_it_off():
    assert _python(BOUND_F1.format(pre=""), FAIRSEQ_DISTILL_EAGER_IMPORTS="1") == "function function True"


def test_modules_imported_before_fairseq_are_used_as_they_are():
    """Nothing to save once scipy.stats is loaded: fairseq binds the real functions."""
    assert _python(BOUND_F1.format(pre="import scipy.stats, sklearn.metrics")) == "function function True"
