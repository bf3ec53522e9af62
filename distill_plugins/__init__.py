"""fairseq-distill: knowledge distillation of language models as fairseq plugins.

``fairseq-train --user-dir distill_plugins ...`` (or ``import distill_plugins``) registers the task
``instruction_distillation``, the divergence criterions, the ``kd_gpt2_*`` architectures and ``hf_causal_lm``.
"""
import logging

# fairseq's text_to_speech task logs "Please install tensorboardX" when first imported; nothing here needs it.
logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)

from . import compat, fairseq_console  # noqa: E402

fairseq_console.restore_log_format()
fairseq_console.silence_dependency_notices()

compat.apply()

from . import criterions, models, tasks  # noqa: E402,F401  (registration side effects)
from .models import gpt2_family, hf_causal_lm  # noqa: E402,F401
from .tasks import instruction_distillation  # noqa: E402,F401
from .tasks import minillm  # noqa: E402,F401

fairseq_console.restore_log_format()  # again: imported first (distill-train), fairseq's models come in above

__version__ = "0.1.0"
