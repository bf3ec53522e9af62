"""One example in two tokenizations, the student's and the teacher's, for cross-tokenizer KD.

``distill-prepare --teacher-spm-model/--teacher-hf-tokenizer`` writes the teacher's tokenization of
the same rows in the same order (``DATA/teacher``). A batch is the student's usual sample
(``prompt_response_dataset.collate_examples``) with the teacher's version of the same examples under
``sample["teacher"]`` (its own ``net_input``, ``target`` and ``prompt_lengths``, in the teacher's
dictionary). Batches are sized by the longer of the two tokenizations.
"""
import numpy as np

from .prompt_response_dataset import PromptResponseDataset, SizeOrderedDataset, collate_examples


class PairedTokenizationDataset(SizeOrderedDataset):
    def __init__(self, student: PromptResponseDataset, teacher: PromptResponseDataset):
        assert len(student) == len(teacher), "the two tokenizations differ in length"
        self.student, self.teacher = student, teacher
        self.shuffle = student.shuffle
        self.sizes = np.maximum(student.sizes, teacher.sizes)
        self.prompt_sizes = student.prompt_sizes

    def __len__(self):
        return len(self.student)

    def __getitem__(self, index):
        return {"student": self.student[index], "teacher": self.teacher[index]}

    def collater(self, samples):
        if len(samples) == 0:
            return {}
        sample = collate_examples([s["student"] for s in samples], self.student.pad)
        teacher = collate_examples([s["teacher"] for s in samples], self.teacher.pad)
        sample["teacher"] = {k: teacher[k] for k in ("net_input", "target", "prompt_lengths", "ntokens")}
        return sample
