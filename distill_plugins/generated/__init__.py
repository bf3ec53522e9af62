"""Training on generated data: teacher-generated datasets (SeqKD, ``distill-seqkd``) and
student-generated batches inside ``fairseq-train`` (ImitKD, GKD, DistiLLM; spec sections 1 and 3).

``config.StudentDataConfig`` holds the task options, ``schedule`` the data-source decision and the
adaptive threshold, ``replay_buffer`` the buffer, ``responses`` generation + labelling, and
``student_data.StudentData`` ties them together behind the task's ``train_step``.
"""
