"""PromptResponseDataset's sizes (what fairseq batches by --max-tokens) and label counts (the warning
about prompts that leave no response token) are those of the examples it returns."""
import distill_plugins  # noqa: F401
from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask


def test_sizes_and_label_counts_are_the_examples(data_bin):
    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin, seed=1))
    task.load_dataset("valid")
    ds, pad = task.dataset("valid"), task.dictionary.pad()
    counts = ds.label_counts()
    assert len(ds) > 1
    for i in range(len(ds)):
        ex = ds[i]
        assert ds.size(i) == ds.num_tokens(i) == len(ex["source"])
        assert int(counts[i]) == int(ex["target"].ne(pad).sum()) > 0
