"""Workarounds that fairseq 0.12.3 needs on numpy 2 and torch >= 2.6 (see README, "Why ve-fairseq").

- numpy 2 removed ``np.compat``; fairseq's LM datasets still read ``np.compat.long``.
- torch >= 2.6 loads checkpoints with ``weights_only=True``; legacy fairseq checkpoints pickle an
  ``argparse.Namespace``, which must be allow-listed.
"""
import argparse
import types

import numpy as np
import torch


def apply():
    try:
        np.compat.long  # noqa: B018
    except AttributeError:
        np.compat = types.SimpleNamespace(long=int)
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([argparse.Namespace])
